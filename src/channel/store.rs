//! Channel state.
