//! A host's sample for one interval and its wire form (`agent.capnp`'s `HostSample`): the agent
//! encodes it, the control node decodes it, one mapping for both.

use crate::agent_capnp::host_sample;
use crate::sketch::Sketch;

/// One interval of one host.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostSample {
    pub at_unix_ms: u64,
    pub cpu_util: f32,
    pub cpu_steal: f32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub run_delay_ns: u64,
    pub gpu_util: Vec<f32>,
    pub gpu_memory_used_bytes: Vec<u64>,
    pub gpu_power_watts: Vec<f32>,
    pub gpu_temperature_c: Vec<f32>,
    /// Run-queue waits on every CPU in the interval, where the host runs the eBPF probes.
    pub run_queue: Option<Sketch>,
}

impl HostSample {
    pub fn encode(&self, mut b: host_sample::Builder<'_>) {
        b.set_at_unix_ms(self.at_unix_ms);
        b.set_cpu_util(self.cpu_util);
        b.set_cpu_steal(self.cpu_steal);
        b.set_memory_used_bytes(self.memory_used_bytes);
        b.set_memory_total_bytes(self.memory_total_bytes);
        b.set_net_rx_bytes(self.net_rx_bytes);
        b.set_net_tx_bytes(self.net_tx_bytes);
        b.set_run_delay_ns(self.run_delay_ns);
        let mut g = b.reborrow().init_gpu_util(self.gpu_util.len() as u32);
        for (i, u) in self.gpu_util.iter().enumerate() {
            g.set(i as u32, *u);
        }
        let mut m = b
            .reborrow()
            .init_gpu_memory_used_bytes(self.gpu_memory_used_bytes.len() as u32);
        for (i, u) in self.gpu_memory_used_bytes.iter().enumerate() {
            m.set(i as u32, *u);
        }
        let mut p = b
            .reborrow()
            .init_gpu_power_watts(self.gpu_power_watts.len() as u32);
        for (i, w) in self.gpu_power_watts.iter().enumerate() {
            p.set(i as u32, *w);
        }
        let mut t = b
            .reborrow()
            .init_gpu_temperature_c(self.gpu_temperature_c.len() as u32);
        for (i, c) in self.gpu_temperature_c.iter().enumerate() {
            t.set(i as u32, *c);
        }
        if let Some(sketch) = &self.run_queue {
            b.set_probes(true);
            b.set_run_queue_p99_ns(sketch.quantile(0.99) as u64);
            sketch.encode(b.init_run_queue_latency_ns());
        }
    }

    pub fn decode(h: host_sample::Reader<'_>) -> capnp::Result<HostSample> {
        Ok(HostSample {
            at_unix_ms: h.get_at_unix_ms(),
            cpu_util: h.get_cpu_util(),
            cpu_steal: h.get_cpu_steal(),
            memory_used_bytes: h.get_memory_used_bytes(),
            memory_total_bytes: h.get_memory_total_bytes(),
            net_rx_bytes: h.get_net_rx_bytes(),
            net_tx_bytes: h.get_net_tx_bytes(),
            run_delay_ns: h.get_run_delay_ns(),
            gpu_util: h.get_gpu_util()?.iter().collect(),
            gpu_memory_used_bytes: h.get_gpu_memory_used_bytes()?.iter().collect(),
            gpu_power_watts: h.get_gpu_power_watts()?.iter().collect(),
            gpu_temperature_c: h.get_gpu_temperature_c()?.iter().collect(),
            run_queue: if h.get_probes() {
                Some(Sketch::decode(h.get_run_queue_latency_ns()?)?)
            } else {
                None
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_round_trips() {
        let mut run_queue = Sketch::default();
        for ns in [1_000.0, 20_000.0, 300_000.0] {
            run_queue.record(ns);
        }
        let sample = HostSample {
            at_unix_ms: 1_765_000_000_123,
            cpu_util: 0.42,
            cpu_steal: 0.01,
            memory_used_bytes: 3 << 30,
            memory_total_bytes: 16 << 30,
            net_rx_bytes: 12_345,
            net_tx_bytes: 67_890,
            run_delay_ns: 4_000_000,
            gpu_util: vec![0.9, 0.1],
            gpu_memory_used_bytes: vec![40 << 30, 1 << 30],
            gpu_power_watts: vec![350.0, 80.5],
            gpu_temperature_c: vec![71.0, 40.0],
            run_queue: Some(run_queue),
        };
        for s in [sample.clone(), HostSample::default()] {
            let mut msg = capnp::message::Builder::new_default();
            s.encode(msg.init_root());
            let bytes = capnp::serialize::write_message_to_words(&msg);
            let read = capnp::serialize::read_message(
                &mut bytes.as_slice(),
                capnp::message::ReaderOptions::new(),
            )
            .unwrap();
            let back = HostSample::decode(read.get_root().unwrap()).unwrap();
            assert_eq!(back, s);
        }
    }
}
