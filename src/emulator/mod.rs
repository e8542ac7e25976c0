//! A faithful local emulator of the Azure DevOps PAT Lifecycle API, the
//! Entra token endpoint and a small data plane. TODO(emulator helper).
