//! Wall-clock time for what users read (event times, heartbeats, telemetry seconds). Decisions
//! never read it: their clock is the cluster's monotonic `now`.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
