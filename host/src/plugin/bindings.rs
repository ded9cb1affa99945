//! Host bindings generated from `wit/aggregator.wit`: the core world, which
//! every plugin (0.1.0 and later) exports. The 0.2.0 additions (`migrates-from`,
//! `migrate`, `merges`, `merge`) are looked up by name on each instance, so
//! that plugins built without them still load.

wasmtime::component::bindgen!({
    world: "aggregator-core",
    path: "../wit",
});

pub use AggregatorCore as Aggregator;
pub use AggregatorCorePre as AggregatorPre;
