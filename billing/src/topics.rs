//! The product's Kafka topics, created and kept by `aigw-billing topics` (the Helm chart's hook Job
//! runs it after install and before each upgrade). Idempotent: a missing topic is created; an
//! existing one gets more partitions when it has fewer than asked and its `retention.ms` set when
//! it differs. Nothing is ever shrunk or deleted: Kafka cannot remove partitions, and fewer would
//! reorder keys; a topic with more partitions or another replication factor is reported, not
//! changed.

use std::{fmt, str::FromStr, time::Duration};

use rdkafka::{
    ClientConfig,
    admin::{
        AdminClient, AdminOptions, AlterConfig, ConfigSource, NewPartitions, NewTopic,
        ResourceSpecifier, TopicReplication,
    },
    client::DefaultClientContext,
    consumer::{BaseConsumer, Consumer},
};

/// One topic as asked for: `name:partitions:replicationFactor:retentionMs` on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub replication: i32,
    /// `retention.ms`; -1 keeps records forever.
    pub retention_ms: i64,
}

impl FromStr for TopicSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split(':').collect();
        let [name, partitions, replication, retention] = parts.as_slice() else {
            return Err(format!(
                "{s:?}: expected name:partitions:replicationFactor:retentionMs, e.g. usage.events:6:3:604800000"
            ));
        };
        if name.is_empty()
            || name.len() > 249
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(format!(
                "{name:?} is not a Kafka topic name (1–249 of [A-Za-z0-9._-])"
            ));
        }
        let positive = |what: &str, v: &str| -> Result<i32, String> {
            v.parse::<i32>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| format!("{name}: {what} {v:?} is not a whole number ≥ 1"))
        };
        let retention_ms = retention
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= -1)
            .ok_or_else(|| {
                format!("{name}: retentionMs {retention:?} is not -1 or a whole number ≥ 0")
            })?;
        Ok(Self {
            name: (*name).to_owned(),
            partitions: positive("partitions", partitions)?,
            replication: positive("replicationFactor", replication)?,
            retention_ms,
        })
    }
}

/// What `ensure` did or saw for one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Created,
    PartitionsGrown {
        from: i32,
        to: i32,
    },
    RetentionSet {
        from: Option<String>,
        to: i64,
    },
    /// More partitions than asked: left alone.
    MorePartitions {
        have: i32,
        asked: i32,
    },
    /// Another replication factor than asked: changing it is a reassignment, left to the
    /// Kafka operator.
    OtherReplication {
        have: i32,
        asked: i32,
    },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Created => write!(f, "created"),
            Self::PartitionsGrown { from, to } => write!(f, "partitions {from} → {to}"),
            Self::RetentionSet { from, to } => write!(
                f,
                "retention.ms {} → {to}",
                from.as_deref().unwrap_or("(default)")
            ),
            Self::MorePartitions { have, asked } => {
                write!(
                    f,
                    "has {have} partitions, {asked} asked: left as is (never shrunk)"
                )
            }
            Self::OtherReplication { have, asked } => write!(
                f,
                "replication factor {have}, {asked} asked: left as is (a reassignment is the Kafka operator's)"
            ),
        }
    }
}

/// Creates or updates `specs` on the cluster at `brokers`; returns what changed per topic.
///
/// # Errors
/// When Kafka cannot be reached or refuses a change (e.g. a replication factor above the
/// number of brokers), with the topic and Kafka's reason.
pub async fn ensure(
    brokers: &str,
    specs: &[TopicSpec],
    timeout: Duration,
) -> anyhow::Result<Vec<(String, Vec<Change>)>> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let opts = AdminOptions::new().operation_timeout(Some(timeout));
    // (name, partitions, replication factor) of every topic; librdkafka's metadata call blocks.
    let probe: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let metadata: Vec<(String, i32, i32)> = tokio::task::spawn_blocking(move || {
        probe.fetch_metadata(None, timeout).map(|m| {
            m.topics()
                .iter()
                .map(|t| {
                    let replicas = t.partitions().first().map_or(0, |p| p.replicas().len());
                    (
                        t.name().to_owned(),
                        i32::try_from(t.partitions().len()).unwrap_or(i32::MAX),
                        i32::try_from(replicas).unwrap_or(i32::MAX),
                    )
                })
                .collect()
        })
    })
    .await??;
    let mut report = Vec::new();
    for spec in specs {
        let mut changes = Vec::new();
        let existing = metadata
            .iter()
            .find(|(name, _, _)| *name == spec.name)
            .map(|(_, partitions, replication)| (*partitions, *replication));
        match existing {
            None => {
                let retention = spec.retention_ms.to_string();
                let topic = NewTopic::new(
                    &spec.name,
                    spec.partitions,
                    TopicReplication::Fixed(spec.replication),
                )
                .set("retention.ms", &retention);
                for r in admin.create_topics([&topic], &opts).await? {
                    match r {
                        Ok(_) => changes.push(Change::Created),
                        // Another run created it between our read and our write: fine.
                        Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
                        Err((t, e)) => anyhow::bail!("creating topic {t}: {e}"),
                    }
                }
            }
            Some((have, replication)) => {
                if have < spec.partitions {
                    let grow = NewPartitions::new(&spec.name, usize::try_from(spec.partitions)?);
                    for r in admin.create_partitions([&grow], &opts).await? {
                        r.map_err(|(t, e)| anyhow::anyhow!("adding partitions to {t}: {e}"))?;
                    }
                    changes.push(Change::PartitionsGrown {
                        from: have,
                        to: spec.partitions,
                    });
                } else if have > spec.partitions {
                    changes.push(Change::MorePartitions {
                        have,
                        asked: spec.partitions,
                    });
                }
                if replication != spec.replication {
                    changes.push(Change::OtherReplication {
                        have: replication,
                        asked: spec.replication,
                    });
                }
                if let Some(change) = set_retention(&admin, &opts, spec).await? {
                    changes.push(change);
                }
            }
        }
        report.push((spec.name.clone(), changes));
    }
    Ok(report)
}

/// Sets `retention.ms` when it differs, keeping the topic's other dynamic settings (Kafka's
/// `AlterConfigs` replaces the whole set, so they are sent again).
async fn set_retention(
    admin: &AdminClient<DefaultClientContext>,
    opts: &AdminOptions,
    spec: &TopicSpec,
) -> anyhow::Result<Option<Change>> {
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic(&spec.name)], opts)
        .await?;
    let Some(config) = described.into_iter().next() else {
        anyhow::bail!("describing topic {}: no answer", spec.name);
    };
    let config = config.map_err(|e| anyhow::anyhow!("describing topic {}: {e}", spec.name))?;
    let want = spec.retention_ms.to_string();
    let current = config.get("retention.ms").and_then(|e| e.value.clone());
    if current.as_deref() == Some(want.as_str()) {
        return Ok(None);
    }
    let mut alter = AlterConfig::new(ResourceSpecifier::Topic(&spec.name));
    for entry in &config.entries {
        if entry.source == ConfigSource::DynamicTopic
            && entry.name != "retention.ms"
            && let Some(v) = &entry.value
        {
            alter = alter.set(&entry.name, v);
        }
    }
    alter = alter.set("retention.ms", &want);
    for r in admin.alter_configs([&alter], opts).await? {
        r.map_err(|(t, e)| anyhow::anyhow!("setting retention.ms of {t:?}: {e}"))?;
    }
    Ok(Some(Change::RetentionSet {
        from: current,
        to: spec.retention_ms,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_say_why() {
        let s: TopicSpec = "usage.events:6:3:604800000".parse().unwrap();
        assert_eq!(
            s,
            TopicSpec {
                name: "usage.events".into(),
                partitions: 6,
                replication: 3,
                retention_ms: 604_800_000
            }
        );
        assert_eq!("t:1:1:-1".parse::<TopicSpec>().unwrap().retention_ms, -1);
        for (bad, says) in [
            ("usage.events:6:3", "expected name:partitions"),
            ("bad/name:1:1:1", "not a Kafka topic name"),
            ("t:0:1:1", "partitions \"0\""),
            ("t:1:x:1", "replicationFactor \"x\""),
            ("t:1:1:-2", "retentionMs \"-2\""),
        ] {
            let e = bad.parse::<TopicSpec>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
