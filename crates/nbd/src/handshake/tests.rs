//! Handshake tests against scripted servers: the bytes the server sends are prepared in
//! advance, and what the client wrote is checked afterwards.

use super::*;
use std::io::Cursor;

struct Mock {
    input: Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Read for Mock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Mock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Server-side script builder.
#[derive(Default)]
struct Script(Vec<u8>);

impl Script {
    fn greeting(mut self, hflags: u16) -> Self {
        self.0.extend_from_slice(&NBDMAGIC.to_be_bytes());
        self.0.extend_from_slice(&IHAVEOPT.to_be_bytes());
        self.0.extend_from_slice(&hflags.to_be_bytes());
        self
    }
    fn reply(mut self, option: u32, kind: u32, data: &[u8]) -> Self {
        self.0.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        self.0.extend_from_slice(&option.to_be_bytes());
        self.0.extend_from_slice(&kind.to_be_bytes());
        self.0.extend_from_slice(&(data.len() as u32).to_be_bytes());
        self.0.extend_from_slice(data);
        self
    }
    fn context(self, id: u32, name: &str) -> Self {
        let mut d = id.to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        self.reply(OPT_SET_META_CONTEXT, REP_META_CONTEXT, &d)
    }
    fn info_export(self, size: u64, flags: u16) -> Self {
        let mut d = INFO_EXPORT.to_be_bytes().to_vec();
        d.extend_from_slice(&size.to_be_bytes());
        d.extend_from_slice(&flags.to_be_bytes());
        self.reply(OPT_GO, REP_INFO, &d)
    }
    fn info_block_size(self, min: u32, pref: u32, max: u32) -> Self {
        let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [min, pref, max] {
            d.extend_from_slice(&v.to_be_bytes());
        }
        self.reply(OPT_GO, REP_INFO, &d)
    }
    fn run(self, export: &str, contexts: &[&str]) -> (Result<ExportInfo, Error>, Vec<u8>) {
        let mut m = Mock { input: Cursor::new(self.0), output: Vec::new() };
        let contexts: Vec<String> = contexts.iter().map(|s| s.to_string()).collect();
        let r = negotiate(&mut m, "test", export, &contexts);
        (r, m.output)
    }
}

fn full_script() -> Script {
    Script::default()
        .greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        .reply(OPT_STRUCTURED_REPLY, REP_ACK, &[])
        .context(7, "base:allocation")
        .context(9, "qemu:dirty-bitmap:b0")
        .reply(OPT_SET_META_CONTEXT, REP_ACK, &[])
        .info_block_size(1, 4096, 32 << 20)
        .reply(OPT_GO, REP_INFO, &[0, 1, b'd']) // NBD_INFO_NAME: ignored
        .info_export(1 << 30, 1 | FLAG_READ_ONLY | FLAG_CAN_MULTI_CONN)
        .reply(OPT_GO, REP_ACK, &[])
}

#[test]
fn full_negotiation() {
    let (r, out) = full_script().run("disk", &["base:allocation", "qemu:dirty-bitmap:b0"]);
    let info = r.unwrap();
    assert_eq!(info.size, 1 << 30);
    assert!(info.is_read_only() && info.can_multi_conn() && info.structured_replies);
    assert_eq!(info.block_size, Some(BlockSize { minimum: 1, preferred: 4096, maximum: 32 << 20 }));
    assert_eq!(info.context_id("base:allocation"), Some(7));
    assert_eq!(info.context_id("qemu:dirty-bitmap:b0"), Some(9));
    assert_eq!(info.max_request(), 32 << 20);

    // Client flags, then STRUCTURED_REPLY, SET_META_CONTEXT and GO, byte for byte.
    let mut want = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes().to_vec();
    let opt = |want: &mut Vec<u8>, o: u32, d: &[u8]| {
        want.extend_from_slice(&IHAVEOPT.to_be_bytes());
        want.extend_from_slice(&o.to_be_bytes());
        want.extend_from_slice(&(d.len() as u32).to_be_bytes());
        want.extend_from_slice(d);
    };
    opt(&mut want, OPT_STRUCTURED_REPLY, &[]);
    let mut d = Vec::new();
    put_string(&mut d, "disk");
    d.extend_from_slice(&2u32.to_be_bytes());
    put_string(&mut d, "base:allocation");
    put_string(&mut d, "qemu:dirty-bitmap:b0");
    opt(&mut want, OPT_SET_META_CONTEXT, &d);
    let mut d = Vec::new();
    put_string(&mut d, "disk");
    d.extend_from_slice(&[0, 1, 0, 3]);
    opt(&mut want, OPT_GO, &d);
    assert_eq!(out, want);
}

#[test]
fn missing_bitmap_is_its_own_error() {
    let (r, _) = Script::default()
        .greeting(FLAG_FIXED_NEWSTYLE)
        .reply(OPT_STRUCTURED_REPLY, REP_ACK, &[])
        .context(1, "base:allocation")
        .reply(OPT_SET_META_CONTEXT, REP_ACK, &[])
        .run("disk", &["base:allocation", "qemu:dirty-bitmap:nightly"]);
    match r {
        Err(Error::BitmapNotFound { export, bitmap }) => {
            assert_eq!((export.as_str(), bitmap.as_str()), ("disk", "nightly"))
        }
        other => panic!("{other:?}"),
    }
    let (r, _) = Script::default()
        .greeting(FLAG_FIXED_NEWSTYLE)
        .reply(OPT_STRUCTURED_REPLY, REP_ACK, &[])
        .reply(OPT_SET_META_CONTEXT, REP_ACK, &[])
        .run("disk", &["base:allocation"]);
    assert!(matches!(r, Err(Error::ContextNotGranted { .. })), "{r:?}");
}

#[test]
fn contexts_need_structured_replies() {
    let (r, _) = Script::default()
        .greeting(FLAG_FIXED_NEWSTYLE)
        .reply(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[])
        .run("disk", &["base:allocation"]);
    assert!(matches!(r, Err(Error::MetaContextsUnsupported { .. })), "{r:?}");
}

#[test]
fn go_errors_are_named() {
    let base = || Script::default().greeting(FLAG_FIXED_NEWSTYLE).reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]);
    let (r, _) = base().reply(OPT_GO, REP_ERR_UNKNOWN, b"no such export").run("nope", &[]);
    match r {
        Err(e @ Error::ExportNotFound { .. }) => assert!(e.to_string().contains("no such export"), "{e}"),
        other => panic!("{other:?}"),
    }
    let (r, _) = base().reply(OPT_GO, REP_ERR_TLS_REQD, &[]).run("x", &[]);
    assert!(matches!(r, Err(Error::TlsRequired { .. })), "{r:?}");
    let (r, _) = base().reply(OPT_GO, 0x8000_0002, b"go away").run("x", &[]);
    match r {
        Err(Error::OptionRejected { reply, message, .. }) => {
            assert_eq!((reply.as_str(), message.as_str()), ("NBD_REP_ERR_POLICY", "go away"))
        }
        other => panic!("{other:?}"),
    }
    let (r, _) = base().reply(OPT_GO, REP_ACK, &[]).run("x", &[]);
    assert!(matches!(r, Err(Error::Protocol { .. })), "ACK without INFO_EXPORT: {r:?}");
    let (r, _) = base().info_block_size(3, 4096, 1 << 20).run("x", &[]);
    assert!(matches!(r, Err(Error::Protocol { .. })), "minimum not a power of two: {r:?}");
}

#[test]
fn old_servers_get_export_name() {
    // No NO_ZEROES: the 124 zero bytes follow the export size and flags.
    let mut s = Script::default().greeting(FLAG_FIXED_NEWSTYLE).reply(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[]).reply(
        OPT_GO,
        REP_ERR_UNSUP,
        &[],
    );
    s.0.extend_from_slice(&4096u64.to_be_bytes());
    s.0.extend_from_slice(&1u16.to_be_bytes());
    s.0.extend_from_slice(&[0u8; 124]);
    let (r, out) = s.run("e", &[]);
    let info = r.unwrap();
    assert_eq!((info.size, info.structured_replies, info.block_size), (4096, false, None));
    assert!(out.ends_with(&[0, 0, 0, 1, 0, 0, 0, 1, b'e']), "EXPORT_NAME sent last");

    let (r, _) = Script::default()
        .greeting(FLAG_FIXED_NEWSTYLE)
        .reply(OPT_STRUCTURED_REPLY, REP_ACK, &[])
        .reply(OPT_GO, REP_ERR_UNSUP, &[])
        .run("e", &[]);
    assert!(matches!(r, Err(Error::ExportNotFound { .. })), "closed after EXPORT_NAME: {r:?}");
}

#[test]
fn foreign_servers_are_refused() {
    let mut old = Script::default();
    old.0.extend_from_slice(&NBDMAGIC.to_be_bytes());
    old.0.extend_from_slice(&CLISERV_MAGIC.to_be_bytes());
    let (r, _) = old.run("", &[]);
    assert!(r.unwrap_err().to_string().contains("oldstyle"));
    let (r, _) = Script(b"SSH-2.0-OpenSSH_9.2\r\n".to_vec()).run("", &[]);
    assert!(matches!(r, Err(Error::NotSupported { .. })), "{r:?}");
    let (r, _) = Script::default().greeting(0).run("", &[]);
    assert!(r.unwrap_err().to_string().contains("fixed newstyle"));
}

#[test]
fn wrong_or_huge_replies_are_protocol_errors() {
    let (r, _) = Script::default().greeting(FLAG_FIXED_NEWSTYLE).reply(OPT_GO, REP_ACK, &[]).run("", &[]);
    assert!(matches!(r, Err(Error::Protocol { source: ProtocolError::WrongOption { .. }, .. })), "{r:?}");
    let mut s = Script::default().greeting(FLAG_FIXED_NEWSTYLE);
    s.0.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    s.0.extend_from_slice(&OPT_STRUCTURED_REPLY.to_be_bytes());
    s.0.extend_from_slice(&REP_ACK.to_be_bytes());
    s.0.extend_from_slice(&u32::MAX.to_be_bytes());
    let (r, _) = s.run("", &[]);
    assert!(matches!(r, Err(Error::Protocol { source: ProtocolError::TooLong { .. }, .. })), "{r:?}");
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let full = full_script().0;
    for cut in 0..full.len() {
        let (r, _) = Script(full[..cut].to_vec()).run("disk", &["base:allocation", "qemu:dirty-bitmap:b0"]);
        assert!(r.is_err(), "prefix of {cut} bytes accepted");
    }
    // Random corruption of single bytes: any outcome but a panic.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..2000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut bytes = full.clone();
        let i = (x as usize) % bytes.len();
        bytes[i] = (x >> 32) as u8;
        let _ = Script(bytes).run("disk", &["base:allocation", "qemu:dirty-bitmap:b0"]);
    }
}
