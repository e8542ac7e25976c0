//! reqwest client for the PAT Lifecycle API. TODO(upstream helper).
