//! Archiving policy (being written).
