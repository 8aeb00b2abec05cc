//! Arbitrary bytes through the decoder and the transaction assembler: nothing may panic.
#![no_main]

use deeprecall_replication::{TxnAssembler, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The whole input as one message.
    let _ = parse(data);

    // The input as a stream: each chunk is a big-endian u16 length, then that many bytes of one
    // message, so the fuzzer can build Relation -> Begin -> Insert -> Commit sequences.
    let mut asm = TxnAssembler::new();
    let mut rest = data;
    while let [hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (msg, next) = tail.split_at(len);
        rest = next;
        if let Ok(msg) = parse(msg) {
            if asm.push(msg).is_err() {
                // What the server does on any error: start over from a clean state.
                asm.reset();
            }
        }
    }
});
