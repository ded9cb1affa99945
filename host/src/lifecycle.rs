//! Changing a running instance's aggregations: a reload of the config file
//! (`SIGHUP`, `wagg reload`, `POST /v1/admin/reload`) and a reset of one
//! aggregation (`POST /v1/admin/reset`).
//!
//! Everything that can fail for a reason the operator must fix — the file,
//! the plugins, their params, a change a reload cannot make — is checked
//! here first, on the caller's thread; only then is the change handed to
//! the consumer thread, which makes it between two batches (see
//! `apply::control`) and answers. The API then serves the new set.

use std::collections::BTreeSet;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::apply::{Aggregation, Control, ControlChange, Reconfigure};
use crate::config::{AggregationConfig, Config};
use crate::plugin::{LoadedPlugin, PluginRuntime};
use crate::serve::admin::{Admin, AdminError};
use crate::serve::openapi::{AggregationUpdate, ReloadReport, ResetAnswer};
use crate::serve::{Aggregations, QueryableAggregation};
use crate::state::store::{AggregationMeta, StateStore};
use crate::tools::state_admin::{ResetTo, consumed_by, start_at};

/// How long a request waits for the consumer thread to make the change
/// (it does between two batches: normally within a batch's time).
const CONSUMER_ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// The running instance's aggregations, as admin requests change them.
pub struct Lifecycle {
    /// The config running now; held while a request is carried out, so
    /// requests are made one at a time.
    running: Mutex<Config>,
    runtime: PluginRuntime,
    store: Arc<StateStore>,
    controls: mpsc::Sender<Control>,
    served: Arc<Aggregations>,
}

impl Lifecycle {
    pub fn new(
        config: Config,
        runtime: PluginRuntime,
        store: Arc<StateStore>,
        controls: mpsc::Sender<Control>,
        served: Arc<Aggregations>,
    ) -> Self {
        Self {
            running: Mutex::new(config),
            runtime,
            store,
            controls,
            served,
        }
    }

    /// Hands a change to the consumer thread and waits for it to be made.
    fn send(&self, change: ControlChange) -> Result<(), AdminError> {
        let (done, answer) = mpsc::sync_channel(1);
        let stopped = || {
            AdminError::Unavailable(
                "consumption has stopped (see /readyz); restart wagg to apply the config".into(),
            )
        };
        self.controls
            .send(Control { change, done })
            .map_err(|_| stopped())?;
        match answer.recv_timeout(CONSUMER_ANSWER_TIMEOUT) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(AdminError::Unavailable(message)),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(AdminError::Unavailable(format!(
                "the consumer did not take the change within {CONSUMER_ANSWER_TIMEOUT:?}; it is made when it does"
            ))),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(stopped()),
        }
    }

    fn reload_locked(&self, running: &mut Config) -> Result<ReloadReport, AdminError> {
        let refused = AdminError::Refused;
        if running.cluster.is_some() {
            return Err(refused(
                "reload is not supported in cluster mode (every instance must run the same aggregations): change each instance's config and restart them one by one".into(),
            ));
        }
        let path = running.path.clone().ok_or_else(|| {
            refused("this instance was not started from a config file: nothing to reload".into())
        })?;
        let mut new = Config::load(&path).map_err(|e| refused(format!("{e}")))?;
        new.progress_interval = running.progress_interval;
        let sections = changed_sections(running, &new);
        if !sections.is_empty() {
            return Err(refused(format!(
                "a reload applies changes to the [[aggregation]] tables only, and {} changed too: restart wagg to apply them (nothing was changed)",
                sections.join(", ")
            )));
        }
        let plan = self.plan(running, &new)?;
        if !plan.report.changed() {
            return Ok(plan.report);
        }
        self.send(ControlChange::Reconfigure(plan.changes))?;
        self.served.replace(plan.served);
        *running = new;
        tracing::info!(report = ?plan.report, "reloaded the config");
        Ok(plan.report)
    }

    /// Checks every aggregation of `new` against the running ones and
    /// prepares the consumer's changes, the API's new set and the report.
    fn plan(&self, running: &Config, new: &Config) -> Result<Plan, AdminError> {
        let cache_entries = new.state.cache_entries / new.aggregations.len().max(1);
        let mut plan = Plan::default();
        for aggregation in &new.aggregations {
            let name = &aggregation.name;
            let current = running.aggregations.iter().find(|a| a.name == *name);
            let served = self.served.get(name);
            if let (Some(current), Some(served)) = (current, &served)
                && same_plugin_file(new, aggregation, served)?
                && current_settings_equal(current, aggregation)
            {
                plan.report.unchanged.push(name.clone());
                plan.served.push(served.clone());
                continue;
            }
            if current.is_none() && aggregation.emit.is_some() {
                return Err(AdminError::Refused(format!(
                    "aggregation {name:?}: a reload cannot add an aggregation that emits (its producer is set up at start): restart wagg"
                )));
            }
            let plugin = self.load(new, aggregation)?;
            plugin
                .check_fits(aggregation)
                .map_err(|e| AdminError::Refused(format!("{}: {e}", new.locate(name, "window"))))?;
            let instance = plugin
                .instantiate(&aggregation.params_json())
                .map_err(|e| {
                    AdminError::Refused(format!("{}: {e:#}", new.locate(name, "params")))
                })?;
            let meta = meta_of(&plugin);
            let prepared = Aggregation::new(
                aggregation.clone(),
                plugin.clone(),
                instance,
                cache_entries,
                Default::default(),
            )
            .split_across(new.apply.threads())
            .map_err(|e| AdminError::Refused(format!("{}: {e}", new.locate(name, "params"))))?;
            let prepared = Box::new(prepared);
            match (current, served) {
                (Some(current), Some(served)) => {
                    let migrating = self
                        .store
                        .aggregation_meta(name)
                        .map_err(|e| AdminError::Unavailable(e.to_string()))?
                        .is_some_and(|stored| stored.migration.is_some());
                    let changes =
                        updates(current, aggregation, &served.plugin, &plugin, migrating)?;
                    let migrate = meta.state_format != served.plugin.metadata().state_format;
                    plan.report.updated.push(AggregationUpdate {
                        name: name.clone(),
                        changes,
                    });
                    plan.changes.push(Reconfigure::Replace {
                        aggregation: prepared,
                        meta,
                        migrate,
                    });
                }
                _ => {
                    plan.report.added.push(name.clone());
                    plan.changes.push(Reconfigure::Add {
                        aggregation: prepared,
                        meta,
                        start: new.source.start_from.into(),
                    });
                }
            }
            plan.served.push(Arc::new(QueryableAggregation::new(
                aggregation.clone(),
                plugin,
            )));
        }
        for old in &running.aggregations {
            if !new.aggregations.iter().any(|a| a.name == old.name) {
                plan.report.removed.push(old.name.clone());
                plan.changes.push(Reconfigure::Remove(old.name.clone()));
            }
        }
        Ok(plan)
    }

    fn load(
        &self,
        config: &Config,
        aggregation: &AggregationConfig,
    ) -> Result<LoadedPlugin, AdminError> {
        self.runtime
            .load(&config.plugin_path(aggregation))
            .map_err(|e| {
                let field = format!("plugin {:?}", aggregation.plugin);
                AdminError::Refused(format!(
                    "{}: {e:#}",
                    config.locate(&aggregation.name, &field)
                ))
            })
    }

    fn reset_locked(
        &self,
        running: &Config,
        aggregation: &str,
        to: &str,
    ) -> Result<ResetAnswer, AdminError> {
        if running.cluster.is_some() {
            return Err(AdminError::Refused(
                "reset is not supported in cluster mode yet: the aggregation's state also lives in its changelog and on the other instances. To rebuild it, rename the aggregation in every instance's config (a new name catches up from `source.start_from`)".into(),
            ));
        }
        let configured = running
            .aggregations
            .iter()
            .find(|a| a.name == aggregation)
            .ok_or_else(|| {
                AdminError::UnknownAggregation(format!(
                    "no aggregation named {aggregation:?} is running"
                ))
            })?;
        let to: ResetTo = to.parse().map_err(AdminError::Refused)?;
        let consumed = consumed_by(&self.store, configured)
            .map_err(|e| AdminError::Unavailable(format!("{e:#}")))?;
        let start = start_at(running, &consumed, to)
            .map_err(|e| AdminError::Unavailable(format!("{e:#}")))?;
        self.send(ControlChange::Reset {
            aggregation: aggregation.to_owned(),
            start,
        })?;
        Ok(ResetAnswer {
            aggregation: aggregation.to_owned(),
            message: format!(
                "reset {aggregation:?}: its state is cleared and it is rebuilt from {to} while the other aggregations go on (its catch-up shows in /v1/aggregations)"
            ),
        })
    }
}

impl Admin for Lifecycle {
    fn reload(&self) -> Result<ReloadReport, AdminError> {
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        self.reload_locked(&mut running)
    }

    fn reset(&self, aggregation: &str, to: &str) -> Result<ResetAnswer, AdminError> {
        let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        self.reset_locked(&running, aggregation, to)
    }
}

/// A reload, prepared.
#[derive(Default)]
struct Plan {
    changes: Vec<Reconfigure>,
    served: Vec<Arc<QueryableAggregation>>,
    report: ReloadReport,
}

/// What the store records of a plugin.
pub fn meta_of(plugin: &LoadedPlugin) -> AggregationMeta {
    let metadata = plugin.metadata();
    AggregationMeta {
        plugin_name: metadata.name.clone(),
        plugin_version: metadata.version.clone(),
        state_format: metadata.state_format,
        content_hash: plugin.content_hash().to_owned(),
        removed: false,
        migration: None,
    }
}

/// The top-level sections (everything but the aggregations) that differ.
fn changed_sections(running: &Config, new: &Config) -> Vec<String> {
    let table = |config: &Config| match serde_json::to_value(config) {
        Ok(serde_json::Value::Object(mut map)) => {
            map.remove("aggregation");
            map
        }
        _ => serde_json::Map::new(),
    };
    let (old, new) = (table(running), table(new));
    let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter(|key| old.get(*key) != new.get(*key))
        .map(|key| format!("[{key}]"))
        .collect()
}

/// Whether the configured file is the build served now (same content).
fn same_plugin_file(
    config: &Config,
    aggregation: &AggregationConfig,
    served: &QueryableAggregation,
) -> Result<bool, AdminError> {
    let path = config.plugin_path(aggregation);
    let bytes = std::fs::read(&path).map_err(|e| {
        AdminError::Refused(format!(
            "aggregation {:?}: cannot read plugin {}: {e}",
            aggregation.name,
            path.display()
        ))
    })?;
    Ok(crate::plugin::content_hash(&bytes) == served.plugin.content_hash())
}

/// Whether two configs of an aggregation say the same (the plugin file's
/// content is compared apart).
fn current_settings_equal(a: &AggregationConfig, b: &AggregationConfig) -> bool {
    a.plugin == b.plugin
        && a.topic == b.topic
        && a.key == b.key
        && a.on_error == b.on_error
        && a.params == b.params
        && a.window == b.window
        && a.time == b.time
        && a.emit == b.emit
}

/// What changes in place, or why it cannot.
fn updates(
    current: &AggregationConfig,
    new: &AggregationConfig,
    current_plugin: &LoadedPlugin,
    new_plugin: &LoadedPlugin,
    migrating: bool,
) -> Result<Vec<String>, AdminError> {
    let name = &new.name;
    if current.emit != new.emit {
        return Err(AdminError::Refused(format!(
            "aggregation {name:?}: a reload cannot change `emit` (its producer is set up at start): restart wagg"
        )));
    }
    if current.topic != new.topic
        || current.key != new.key
        || current.window != new.window
        || current.time != new.time
    {
        return Err(AdminError::Refused(format!(
            "aggregation {name:?}: a reload cannot change `topic`, `key`, `window` or `time` (the stored states would mean something else): add it under a new name (it catches up on its own) and remove the old one"
        )));
    }
    let (old_meta, new_meta) = (meta_of(current_plugin), meta_of(new_plugin));
    let mut changes = Vec::new();
    if old_meta.plugin_name != new_meta.plugin_name
        || old_meta.state_format != new_meta.state_format
    {
        let migrates = old_meta.plugin_name == new_meta.plugin_name
            && new_plugin
                .metadata()
                .migrates_from
                .contains(&old_meta.state_format);
        if !migrates || migrating {
            let why = if migrating {
                "its stored states are still being migrated to the running plugin's format: wait until `/v1/aggregations` no longer shows a `migration` for it"
            } else {
                "its stored states cannot be read by it (it does not migrate from that format)"
            };
            return Err(AdminError::Refused(format!(
                "aggregation {name:?}: the new plugin {} {} writes state format {}, the running {} {} format {}: {why}. Add it under a new name (it catches up on its own) or reset the aggregation",
                new_meta.plugin_name,
                new_meta.plugin_version,
                new_meta.state_format,
                old_meta.plugin_name,
                old_meta.plugin_version,
                old_meta.state_format
            )));
        }
        changes.push(format!(
            "state format {} → {}: every stored key is migrated, then the aggregation catches up on the records that arrived meanwhile",
            old_meta.state_format, new_meta.state_format
        ));
    }
    if old_meta.content_hash != new_meta.content_hash || current.plugin != new.plugin {
        changes.push(format!(
            "plugin {} {} ({}) → {} {} ({})",
            old_meta.plugin_name,
            old_meta.plugin_version,
            short_hash(&old_meta.content_hash),
            new_meta.plugin_name,
            new_meta.plugin_version,
            short_hash(&new_meta.content_hash)
        ));
    }
    if current.params != new.params {
        changes.push("params".into());
    }
    if current.on_error != new.on_error {
        changes.push(format!(
            "on_error {:?} → {:?}",
            current.on_error, new.on_error
        ));
    }
    Ok(changes)
}

fn short_hash(hash: &str) -> String {
    hash.chars().take(12).collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const BASE: &str = r#"
[source]
brokers = "127.0.0.1:9092"
topics = ["purchases"]

[batch]
max_records = 1000

[[aggregation]]
name = "per_user"
plugin = "count.wasm"
"#;

    fn parse(text: &str) -> Config {
        Config::parse(text, "wagg.toml", Path::new("/etc/wagg")).expect("valid config")
    }

    #[test]
    fn only_sections_other_than_the_aggregations_count_as_changed_sections() {
        let base = parse(BASE);
        assert!(changed_sections(&base, &parse(BASE)).is_empty());
        let more_aggregations = format!(
            "{BASE}\n[[aggregation]]\nname = \"spend\"\nplugin = \"stats.wasm\"\nparams = {{ field = \"/amount\" }}\n"
        );
        assert!(changed_sections(&base, &parse(&more_aggregations)).is_empty());
        let other_batch = BASE.replace("max_records = 1000", "max_records = 10");
        assert_eq!(changed_sections(&base, &parse(&other_batch)), ["[batch]"]);
        let other_brokers = other_batch.replace("127.0.0.1:9092", "127.0.0.1:9093");
        assert_eq!(
            changed_sections(&base, &parse(&other_brokers)),
            ["[batch]", "[source]"]
        );
    }

    #[test]
    fn settings_compare_what_the_aggregation_does_not_its_name() {
        let config = parse(BASE);
        let current = &config.aggregations[0];
        assert!(current_settings_equal(current, &current.clone()));
        let mut params = current.clone();
        params.params.insert("n".into(), 3.into());
        assert!(!current_settings_equal(current, &params));
        let mut rekeyed = current.clone();
        rekeyed.key = Some("/user".into());
        assert!(!current_settings_equal(current, &rekeyed));
    }
}
