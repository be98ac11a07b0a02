/* An nbdkit plugin for bench/full_disk.sh: a disk of $FULL_DISK_GIB GiB (default 80)
   with data in every 64 KiB chunk (chunk i holds i + 1 in its first 8 bytes, zeros
   after: unique, compressible), except every 7th chunk and the chunks of leaf page 500
   (chunks 512 000..513 023), which are all zero. Nothing is stored: reads are computed. */
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

static int64_t size;

static void fd_load(void) {
  const char *gib = getenv("FULL_DISK_GIB");
  size = (int64_t)(gib ? atoll(gib) : 80) << 30;
}

static void *fd_open(int readonly) { return NBDKIT_HANDLE_NOT_NEEDED; }

static int64_t fd_get_size(void *handle) { return size; }

static int fd_pread(void *handle, void *buf, uint32_t count, uint64_t offset, uint32_t flags) {
  const uint64_t cs = 65536;
  memset(buf, 0, count);
  for (uint64_t o = (offset + cs - 1) / cs * cs; o + 8 <= offset + count; o += cs) {
    uint64_t i = o / cs;
    if (i % 7 == 0 || (i >= 500 * 1024 && i < 501 * 1024)) continue;
    uint64_t v = i + 1;
    memcpy((char *)buf + (o - offset), &v, 8);
  }
  return 0;
}

static struct nbdkit_plugin plugin = {
  .name = "full-disk",
  .load = fd_load,
  .open = fd_open,
  .get_size = fd_get_size,
  .pread = fd_pread,
};

NBDKIT_REGISTER_PLUGIN(plugin)
