#![allow(clippy::unwrap_used)]
use aigw_standin::{host::Host, plugins};
#[test]
fn smoke() {
    for name in ["ai-proxy", "ext-auth", "model-router"] {
        let t = std::time::Instant::now();
        let wasm = plugins::higress(name).unwrap();
        let r = Host::load(wasm, br#"{"modelToHeader":"x-higress-llm-model"}"#);
        match r {
            Ok((mut h, ok)) => eprintln!(
                "{name}: {:?} configured={ok} logs={:?}",
                t.elapsed(),
                h.state().logs
            ),
            Err(e) => eprintln!("{name}: {:?} ERR {e}", t.elapsed()),
        }
    }
}
