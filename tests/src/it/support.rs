//! Helpers shared by the integration tests.

use std::collections::BTreeMap;

/// The legacy ConfigMap and Secret (tests/fixtures/legacy-configmap.yaml) as an environment.
pub fn legacy_env() -> BTreeMap<String, String> {
    let text = include_str!("../../fixtures/legacy-configmap.yaml");
    let mut env = BTreeMap::new();
    for doc in serde_norway::Deserializer::from_str(text) {
        let value: serde_norway::Value =
            serde::Deserialize::deserialize(doc).expect("fixture is YAML");
        for section in ["data", "stringData"] {
            if let Some(map) = value.get(section).and_then(|m| m.as_mapping()) {
                for (k, v) in map {
                    env.insert(
                        k.as_str().expect("string key").to_string(),
                        v.as_str().expect("string value").to_string(),
                    );
                }
            }
        }
    }
    env
}

/// The secret values of the legacy fixture, which must never be printed.
pub const LEGACY_SECRETS: [&str; 3] = [
    "your-data-source-api-key",
    "YOUR_HOLYSHEEP_API_KEY",
    "secure-password-here",
];

/// A map from pairs.
pub fn env_of(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Every message in a stream, decoded, in stream order (read by sequence, so no consumer is
/// created and the stream is left as it was).
pub async fn stream_messages<T: tardis_common::messages::Envelope>(
    js: &async_nats::jetstream::Context,
    stream: &str,
) -> anyhow::Result<Vec<T>> {
    let mut s = js.get_stream(stream).await?;
    let state = s.info().await?.state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return Ok(out);
    }
    for seq in state.first_sequence..=state.last_sequence {
        match s.get_raw_message(seq).await {
            Ok(m) => out.push(tardis_common::messages::decode(&m.payload)?),
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}
