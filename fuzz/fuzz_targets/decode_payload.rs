//! Feeds arbitrary bytes to the payload decoder as a UDF named `fuzz`.
//!
//! Properties, for scalar, aggregate and window UDFs alike: decoding never
//! panics; a frame that decodes re-encodes to the very same bytes; with a
//! cluster key only correctly signed frames decode. datafusion-python's
//! `DFPYUDF`/`DFPYUDA`/`DFPYUDW` payloads stop after their header: past it
//! lies `cloudpickle.loads`, which runs arbitrary code by design.
#![no_main]

use datafusion_proto::physical_plan::PhysicalExtensionCodec;
use dfship_codec::{ClusterKey, CodecOptions, PythonUdfCodec};
use libfuzzer_sys::fuzz_target;

/// libfuzzer-sys aborts on every panic, even one the decoder catches. arrow-ipc
/// panics on some malformed schemas and the decoder contains those (see
/// `schema_from_ipc`), so let panics raised inside arrow-ipc unwind to it;
/// any other panic still aborts and is reported.
fn tolerate_contained_arrow_ipc_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let abort_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_arrow_ipc = info
                .location()
                .is_some_and(|location| location.file().contains("arrow-ipc"));
            if !in_arrow_ipc {
                abort_hook(info);
            }
        }));
    });
}

fuzz_target!(|data: &[u8]| {
    tolerate_contained_arrow_ipc_panics();
    if data.starts_with(b"DFPYUD") {
        let _ = dfship_codec::wire::dfpy::read_header("fuzz", data);
        return;
    }
    let open = PythonUdfCodec::default();
    if let Ok(udf) = open.try_decode_udf("fuzz", data) {
        let again = open.encode_udf(&udf).expect("re-encoding a decoded UDF");
        assert_eq!(again.as_deref(), Some(data), "re-encoding is byte-identical");
    }
    if let Ok(udaf) = open.try_decode_udaf("fuzz", data) {
        let again = open.encode_udaf(&udaf).expect("re-encoding a decoded UDAF");
        assert_eq!(again.as_deref(), Some(data), "re-encoding is byte-identical");
    }
    if let Ok(udwf) = open.try_decode_udwf("fuzz", data) {
        let again = open.encode_udwf(&udwf).expect("re-encoding a decoded UDWF");
        assert_eq!(again.as_deref(), Some(data), "re-encoding is byte-identical");
    }
    let key = ClusterKey::new(*b"fuzzing-cluster-key-0123456789ab").expect("a valid key");
    let keyed = PythonUdfCodec::new(CodecOptions::default().with_cluster_key(key));
    let _ = keyed.try_decode_udf("fuzz", data);
    let _ = keyed.try_decode_udaf("fuzz", data);
    let _ = keyed.try_decode_udwf("fuzz", data);
});
