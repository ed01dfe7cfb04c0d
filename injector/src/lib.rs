//! Sidecar injection as a library (Pod mutation, AdmissionReview v1 handling, JSONPatch), for
//! weftd's mutating webhook and `weftctl inject`. Nothing is implemented yet: this crate holds
//! the place DESIGN.md gives it until the injection work lands.
