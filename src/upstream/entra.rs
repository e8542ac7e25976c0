//! Entra (Azure AD) bearer token sources. TODO(upstream helper).
