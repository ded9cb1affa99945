//! A live, configured plugin instance and the raw calls into it.

use wasmtime::Store;
use wasmtime::component::{ComponentNamedList, ComponentType, Instance, Lift, Lower};

use super::bindings::Aggregator;
use super::error::{CallError, PluginError};
use super::runtime::{LoadedPlugin, PluginCtx, deadline_ticks};

/// Plugin messages and stderr quoted in errors are cut to this length: they
/// come from untrusted code and end up in logs and dead-letter headers.
const MAX_MESSAGE_BYTES: usize = 1024;

/// A configured instance of a plugin. Not shared between threads: each
/// worker owns its instances.
///
/// After a trap the wasm instance is unusable; it is dropped and a fresh one
/// (configured with the same params) is created on the next call. This is
/// safe because plugins keep no state between calls.
pub struct PluginInstance {
    plugin: LoadedPlugin,
    params_json: String,
    live: Option<(Store<PluginCtx>, Aggregator, Instance)>,
    pub(super) encoder: wagg_abi::BatchEncoder,
}

impl PluginInstance {
    pub(super) fn new(plugin: LoadedPlugin, params_json: String) -> Result<Self, CallError> {
        let mut instance = Self {
            plugin,
            params_json,
            live: None,
            encoder: wagg_abi::BatchEncoder::new(),
        };
        instance.ensure_live()?;
        Ok(instance)
    }

    /// Another instance of the same plugin with the same params (for
    /// another worker applying the same aggregation).
    pub fn sibling(&self) -> Result<PluginInstance, CallError> {
        Self::new(self.plugin.clone(), self.params_json.clone())
    }

    pub fn plugin(&self) -> &LoadedPlugin {
        &self.plugin
    }

    /// Bytes of linear memory the live instance has grown to (0 when none
    /// is live, e.g. after a trap).
    pub fn memory_bytes(&self) -> usize {
        self.live
            .as_ref()
            .map_or(0, |(store, ..)| store.data().limiter.total)
    }

    fn ensure_live(&mut self) -> Result<(), CallError> {
        if self.live.is_some() {
            return Ok(());
        }
        let (mut store, bindings, instance) = self.plugin.instantiate_raw()?;
        let params = self.params_json.clone();
        let configured = guarded_call(&self.plugin, &mut store, |store| {
            bindings.call_configure(store, &params)
        })?;
        configured.map_err(|message| CallError::Rejected {
            plugin: self.plugin.label(),
            message: truncate(message),
        })?;
        self.live = Some((store, bindings, instance));
        Ok(())
    }

    fn call<T>(
        &mut self,
        f: impl FnOnce(
            &Aggregator,
            &Instance,
            &mut Store<PluginCtx>,
        ) -> wasmtime::Result<Result<T, String>>,
    ) -> Result<T, CallError> {
        self.ensure_live()?;
        let Some((store, bindings, instance)) = self.live.as_mut() else {
            unreachable!("ensure_live succeeded");
        };
        match guarded_call(&self.plugin, store, |store| f(bindings, instance, store)) {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(message)) => Err(CallError::Rejected {
                plugin: self.plugin.label(),
                message: truncate(message),
            }),
            Err(e) => {
                self.live = None;
                Err(e)
            }
        }
    }

    /// Calls `apply` with an encoded batch; returns the encoded result,
    /// unchecked.
    pub fn apply_raw(&mut self, batch: &[u8]) -> Result<Vec<u8>, CallError> {
        self.call(|bindings, _, store| bindings.call_apply(store, batch))
    }

    /// Renders one key's state as JSON text.
    pub fn render(&mut self, state: &[u8]) -> Result<String, CallError> {
        self.call(|bindings, _, store| bindings.call_render(store, state))
    }

    /// One state of a key holding the records of `a` and then those of `b`
    /// (`merge`, world 0.2.0). A plugin without `merge` answers with an
    /// error saying so.
    pub fn merge(&mut self, a: &[u8], b: &[u8]) -> Result<Vec<u8>, CallError> {
        self.call_state_export("merge", (a, b))
    }

    /// One key's state of the older format `from_format`, in this plugin's
    /// state format (`migrate`, world 0.2.0). A plugin without `migrate`
    /// answers with an error saying so.
    pub fn migrate(&mut self, from_format: u32, state: &[u8]) -> Result<Vec<u8>, CallError> {
        self.call_state_export("migrate", (from_format, state))
    }

    /// Calls an export added after world 0.1.0 (looked up by name) that
    /// returns a state, capped by `plugins.max_state_bytes` as `apply`'s
    /// states are.
    fn call_state_export<P>(&mut self, name: &str, params: P) -> Result<Vec<u8>, CallError>
    where
        P: ComponentNamedList + Lower + Send + Sync,
    {
        let state = self.call(|_, instance, store| {
            let Some(func) = instance.get_func(&mut *store, name) else {
                return Ok(Err(format!(
                    "the plugin has no `{name}` export (built before world 0.2.0)"
                )));
            };
            let func = func.typed::<P, (Result<Vec<u8>, String>,)>(&*store)?;
            let (state,) = func.call(&mut *store, params)?;
            Ok(state)
        })?;
        let limit = self.plugin.limits().max_state_bytes;
        if state.len() > limit {
            return Err(CallError::StateTooLarge {
                plugin: self.plugin.label(),
                size: state.len(),
                limit,
            });
        }
        Ok(state)
    }
}

/// The plugin's `merges` (world 0.2.0); false when it has none.
pub(super) fn call_merges(
    store: &mut Store<PluginCtx>,
    instance: &Instance,
) -> wasmtime::Result<bool> {
    call_optional_query(store, instance, "merges")
}

/// The plugin's `migrates-from` (world 0.2.0); empty when it has none.
pub(super) fn call_migrates_from(
    store: &mut Store<PluginCtx>,
    instance: &Instance,
) -> wasmtime::Result<Vec<u32>> {
    call_optional_query(store, instance, "migrates-from")
}

/// Calls an export without parameters added after world 0.1.0; the
/// default value when the plugin has none.
fn call_optional_query<R>(
    store: &mut Store<PluginCtx>,
    instance: &Instance,
    name: &str,
) -> wasmtime::Result<R>
where
    R: ComponentType + Lift + Default + Send + Sync + 'static,
{
    let Some(func) = instance.get_func(&mut *store, name) else {
        return Ok(R::default());
    };
    let (value,) = func.typed::<(), (R,)>(&*store)?.call(&mut *store, ())?;
    Ok(value)
}

/// Runs one call with a fresh time budget and turns traps into errors that
/// say what happened.
fn guarded_call<T>(
    plugin: &LoadedPlugin,
    store: &mut Store<PluginCtx>,
    f: impl FnOnce(&mut Store<PluginCtx>) -> wasmtime::Result<T>,
) -> Result<T, CallError> {
    let budget = plugin.limits().call_timeout;
    store.set_epoch_deadline(deadline_ticks(budget));
    store.data_mut().limiter.hit = false;
    store.data().rng.reseed();
    let stderr_before = store.data().stderr.contents().len();
    f(store).map_err(|error| {
        let label = plugin.label();
        let ctx = store.data();
        match error.downcast_ref::<wasmtime::Trap>() {
            Some(wasmtime::Trap::Interrupt) => CallError::Timeout {
                plugin: label,
                budget,
            },
            Some(wasmtime::Trap::StackOverflow) => CallError::StackOverflow { plugin: label },
            _ if ctx.limiter.hit => CallError::MemoryLimit {
                plugin: label,
                limit_bytes: plugin.limits().memory_limit_bytes,
            },
            trap => {
                let stderr = ctx.stderr.contents();
                let stderr =
                    String::from_utf8_lossy(stderr.get(stderr_before..).unwrap_or_default());
                // The trap itself, without wasmtime's backtrace context.
                let message = match trap {
                    // Deep recursion in Rust (and C) plugins exhausts the
                    // shadow stack in linear memory before wasm's own stack.
                    Some(wasmtime::Trap::MemoryOutOfBounds) => {
                        format!(
                            "{} (a stack overflow in the plugin shows up this way)",
                            wasmtime::Trap::MemoryOutOfBounds
                        )
                    }
                    Some(trap) => trap.to_string(),
                    None => error.root_cause().to_string(),
                };
                CallError::Trap {
                    plugin: label,
                    message: truncate(message),
                    stderr: truncate(stderr.trim().to_owned()),
                }
            }
        }
    })
}

pub(super) fn truncate(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_BYTES {
        let mut end = MAX_MESSAGE_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

impl LoadedPlugin {
    /// A configured instance: `params_json` goes to the plugin's `configure`.
    pub fn instantiate(&self, params_json: &str) -> Result<PluginInstance, PluginError> {
        let instance = PluginInstance::new(self.clone(), params_json.to_owned());
        instance.map_err(|e| match e {
            CallError::Rejected { message, .. } => PluginError::Params {
                plugin: self.label(),
                message,
            },
            other => PluginError::Instantiate {
                plugin: self.label(),
                message: other.to_string(),
            },
        })
    }
}
