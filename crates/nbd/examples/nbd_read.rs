//! Reads a whole NBD export and reports the throughput: a measuring tool for the client.
//!
//! ```text
//! cargo run --release -p blockproof-nbd --example nbd_read -- URI [DEPTH [RANGE_BYTES [REQUEST_BYTES]]]
//! ```
//!
//! `DEPTH` requests in flight (default 16), ranges of `RANGE_BYTES` (default 64 KiB, the
//! default chunk size) handed to `Client::reads`, each split into requests of at most
//! `REQUEST_BYTES` (default 2 MiB).

use std::time::Instant;

use blockproof_nbd::{Client, ClientOptions, Uri};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(uri) = args.first() else {
        eprintln!("usage: nbd_read URI [DEPTH [RANGE_BYTES [REQUEST_BYTES]]]");
        std::process::exit(2);
    };
    let uri: Uri = uri.parse()?;
    let arg = |i: usize, default: u64| -> Result<u64, std::num::ParseIntError> {
        args.get(i).map_or(Ok(default), |s| s.parse())
    };
    let depth = arg(1, 16)? as usize;
    let range = arg(2, 64 * 1024)?;
    let request = arg(3, 2 * 1024 * 1024)? as u32;

    let options = ClientOptions { depth, request_size: request, ..ClientOptions::default() };
    let mut client = Client::connect(&uri, options)?;
    let size = client.size();
    let ranges = (0..size.div_ceil(range)).map(|i| (i * range, (size - i * range).min(range) as usize));
    let start = Instant::now();
    let mut bytes = 0u64;
    let mut nonzero = 0u64;
    for r in client.reads(ranges) {
        let (_, data) = r?;
        bytes += data.len() as u64;
        // Touch the data, as a consumer would.
        nonzero += u64::from(data.last().is_some_and(|&b| b != 0));
    }
    let secs = start.elapsed().as_secs_f64();
    client.close()?;
    println!(
        "{bytes} bytes in {secs:.3} s: {:.2} GiB/s (depth {depth}, ranges {range} B, requests <= {request} B, {nonzero} ranges ending non-zero)",
        bytes as f64 / secs / (1u64 << 30) as f64
    );
    Ok(())
}
