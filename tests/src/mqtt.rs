//! Real brokers and real clients for the MQTT tests: mosquitto started on a
//! free loopback port, runnel running in the background, and rumqttc
//! clients that publish with QoS 1 and collect what arrives.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

use crate::{shared_cache_dir, Run, Watchdog};

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The mosquitto binary; Debian puts it in /usr/sbin, which a user's PATH
/// may not hold.
fn mosquitto_bin() -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"] {
        let path = Path::new(dir).join("mosquitto");
        if path.is_file() {
            return path;
        }
    }
    panic!("mosquitto is not installed: run scripts/setup");
}

/// A mosquitto broker on a loopback port, stopped when dropped. Its queues
/// are set so it never drops QoS 1 messages under load, and it persists
/// sessions to its folder so a restart keeps them.
pub struct Mosquitto {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Mosquitto {
    /// Anyone may connect.
    pub fn start(dir: &Path, port: u16) -> Self {
        Self::start_with(dir, port, "allow_anonymous true")
    }

    /// With more configuration lines (which must say who may connect).
    pub fn start_with(dir: &Path, port: u16, extra_config: &str) -> Self {
        std::fs::create_dir_all(dir).expect("broker folder");
        let config = format!(
            "listener {port} 127.0.0.1\n\
             user root\n\
             max_queued_messages 1000000\n\
             max_inflight_messages 0\n\
             persistence true\n\
             persistence_location {}/\n\
             autosave_interval 1\n\
             {extra_config}\n",
            dir.display()
        );
        std::fs::write(dir.join("mosquitto.conf"), config).expect("broker config");
        let mut broker = Mosquitto {
            port,
            dir: dir.to_owned(),
            child: None,
        };
        broker.launch();
        broker
    }

    fn launch(&mut self) {
        let log = std::fs::File::create(self.dir.join("mosquitto.log")).expect("broker log");
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        wait_for_port(self.port);
    }

    /// Stops the broker (SIGTERM, so it saves its sessions).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits until something accepts connections on `port`.
pub fn wait_for_port(port: u16) {
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "nothing listens on port {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// runnel running in the background, its stderr in a file to watch.
pub struct Background {
    child: Child,
    log: PathBuf,
    out: PathBuf,
    _watchdog: Watchdog,
}

impl Background {
    pub fn start(bin: &Path, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let name = crate::unique();
        let log = dir.join(format!("runnel-{name}.log"));
        let out = dir.join(format!("runnel-{name}.out"));
        let child = Command::new(bin)
            .args(args)
            .current_dir(dir)
            .env("RUNNEL_CACHE_DIR", shared_cache_dir())
            .env(
                "RUST_LOG",
                std::env::var("RUNNEL_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).expect("output file"))
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let watchdog = Watchdog::new(child.id());
        Background {
            child,
            log,
            out,
            _watchdog: watchdog,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log holds `text`; panics with the log after `limit`,
    /// or if runnel exits first.
    pub fn wait_for_log(&mut self, text: &str, limit: Duration) {
        let started = Instant::now();
        loop {
            if self.log().contains(text) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "runnel exited ({status}) before logging {text:?}:\n{}",
                    self.log()
                );
            }
            assert!(
                started.elapsed() < limit,
                "runnel did not log {text:?} within {limit:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asks runnel to stop (SIGTERM) and waits for it.
    pub fn stop(self) -> Run {
        self.terminate();
        self.finish()
    }

    /// Sends SIGTERM without waiting.
    pub fn terminate(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for runnel to exit by itself.
    pub fn finish(mut self) -> Run {
        let status = self.child.wait().expect("wait for runnel");
        Run {
            status: status.code(),
            stdout: std::fs::read_to_string(&self.out).unwrap_or_default(),
            stderr: self.log(),
        }
    }

    /// Kills runnel outright (SIGKILL): no draining, no flushing.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn options(client_id: &str, port: u16, clean: bool) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_clean_session(clean);
    options.set_keep_alive(Duration::from_secs(30));
    // Large enough for the oversized messages some tests send on purpose.
    options.set_max_packet_size(16 << 20, 16 << 20);
    options
}

/// Publishes `(topic, payload)` pairs at QoS 1 and returns once the broker
/// acknowledged every one.
pub fn publish_all(port: u16, messages: &[(String, Vec<u8>)]) {
    let id = format!("test-pub-{}", crate::unique());
    let (client, mut connection) = Client::new(options(&id, port, true), messages.len() + 10);
    for (topic, payload) in messages {
        client
            .publish(topic.as_str(), QoS::AtLeastOnce, false, payload.clone())
            .expect("queue a publish");
    }
    let mut acked = 0;
    let started = Instant::now();
    for event in connection.iter() {
        match event {
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                acked += 1;
                if acked == messages.len() {
                    break;
                }
            }
            Ok(_) => {}
            Err(err) => panic!("test publisher: {err}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "only {acked} of {} publishes acknowledged",
            messages.len()
        );
    }
    let _ = client.disconnect();
}

/// A message as received: topic and payload.
pub type Received = (String, Vec<u8>);

/// Collects what arrives on topic filters, with a persistent session so a
/// broker restart loses nothing for it either.
pub struct Collector {
    received: Arc<Mutex<Vec<Received>>>,
    client: Client,
}

impl Collector {
    pub fn start(port: u16, filters: &[&str]) -> Self {
        let id = format!("test-sub-{}", crate::unique());
        let (client, mut connection) = Client::new(options(&id, port, false), 100);
        for filter in filters {
            client
                .subscribe(*filter, QoS::AtLeastOnce)
                .expect("queue a subscribe");
        }
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        let (subscribed_tx, subscribed) = std::sync::mpsc::channel();
        let wanted = filters.len();
        std::thread::spawn(move || {
            let mut subacks = 0;
            for event in connection.iter() {
                match event {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Ok(mut got) = sink.lock() {
                            got.push((p.topic.clone(), p.payload.to_vec()));
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        subacks += 1;
                        if subacks == wanted {
                            let _ = subscribed_tx.send(());
                        }
                    }
                    Ok(_) => {}
                    Err(rumqttc::ConnectionError::RequestsDone) => return,
                    // The broker may be restarting; rumqttc reconnects.
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        subscribed
            .recv_timeout(Duration::from_secs(20))
            .expect("the collector's subscriptions were acknowledged");
        Collector { received, client }
    }

    pub fn received(&self) -> Vec<(String, Vec<u8>)> {
        self.received.lock().map(|g| g.clone()).unwrap_or_default()
    }

    /// Waits until `done` holds for what arrived, or `limit` passes.
    pub fn wait_until(
        &self,
        limit: Duration,
        done: impl Fn(&[(String, Vec<u8>)]) -> bool,
    ) -> Vec<(String, Vec<u8>)> {
        let started = Instant::now();
        loop {
            let got = self.received();
            if done(&got) || started.elapsed() > limit {
                return got;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.client.disconnect();
    }
}

/// Payloads grouped by topic, for assertions.
pub fn by_topic(messages: &[(String, Vec<u8>)]) -> HashMap<String, Vec<String>> {
    let mut map: HashMap<String, Vec<String>> = HashMap::new();
    for (topic, payload) in messages {
        map.entry(topic.clone())
            .or_default()
            .push(String::from_utf8_lossy(payload).into_owned());
    }
    map
}
