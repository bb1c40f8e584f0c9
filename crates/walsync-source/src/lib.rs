pub mod codec;
pub mod datum;
