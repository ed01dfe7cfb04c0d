//! Fuzzes weftd's DNS query path: any bytes, as a UDP or TCP query, through a server block with
//! the kubernetes, cache and loadbalance plugins over a fixture mesh. It must never panic, and
//! every reply must itself parse as a DNS message.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use weft_control_plane::dns::fuzzing;

static BLOCKS: LazyLock<fuzzing::Blocks> = LazyLock::new(fuzzing::fixture);

fuzz_target!(|data: &[u8]| {
    for tcp in [false, true] {
        fuzzing::query(&BLOCKS, data, tcp);
    }
});
