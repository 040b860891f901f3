//! Prints AIGateway's `CustomResourceDefinition`s as YAML (`make generate` writes `crds/crds.yaml`).

use std::io::Write;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let yaml = aigw_crds::crds_yaml()?;
    std::io::stdout().write_all(yaml.as_bytes())?;
    Ok(())
}
