use anyhow::Result;
pub fn run(_a: crate::args::DemoArgs) -> Result<u8> {
    Ok(0)
}
