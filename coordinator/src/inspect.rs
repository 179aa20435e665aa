//! `moeshard inspect`: what a GGUF file holds, read from its header alone.
