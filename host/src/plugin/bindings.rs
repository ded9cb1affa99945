//! Host bindings generated from `wit/aggregator.wit`.

wasmtime::component::bindgen!({
    world: "aggregator",
    path: "../wit",
});
