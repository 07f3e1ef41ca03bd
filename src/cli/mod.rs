//! CLI client commands (publish, consume, stats).
