//! Lua surface (being written).
