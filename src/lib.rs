//! Test support shared by the integration tests, examples and benches of the workspace.
