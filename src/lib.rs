pub use sluice_protocol as protocol;
