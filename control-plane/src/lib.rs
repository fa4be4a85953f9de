//! Flotilla control plane library and operator commands.
