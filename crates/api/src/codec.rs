//! The proxy API's codec: prost with small initial buffers.
//!
//! tonic gives every stream an 8 KiB read buffer and an 8 KiB write buffer
//! up front. A proxy's stream is long-lived and mostly idle, and a control
//! plane holds one per proxy, so those 16 KiB were a large part of its
//! memory per proxy. The buffers start at 1 KiB and grow to the message
//! that needs more (a Config is 1–5 KiB typically, up to the budget).

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial size of a stream's read and write buffers.
pub const INITIAL_BUFFER_BYTES: usize = 1024;
/// tonic's default: how much a stream encodes before yielding.
const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

fn settings() -> BufferSettings {
    BufferSettings::new(INITIAL_BUFFER_BYTES, YIELD_THRESHOLD_BYTES)
}

/// Named by the generated client and server (`codec_path` in build.rs).
#[derive(Debug, Clone, Copy)]
pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        LeanCodec(PhantomData)
    }
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}
