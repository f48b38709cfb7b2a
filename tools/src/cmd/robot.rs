//! The robot's lines, shared by `glimpse watch` and `glimpse serve`: each answer framed onto a
//! serial line (`glimpse_targets::frame`), a busy indicator and a trigger input on Linux GPIO
//! character devices (`glimpse_targets::gpio`, feature `gpio`, on by default on Linux).

use std::path::PathBuf;

use anyhow::{Context, Result};
use glimpse_targets::frame;
use glimpse_targets::hal::IoLines;

/// Flags for the robot's lines.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RobotArgs {
    /// Write each answer as a frame (glimpse_targets::frame, docs/serving.md "Serial frames") to
    /// this serial device (or any file) for a microcontroller; set its speed first, e.g.
    /// `stty -F /dev/ttyUSB0 115200 raw`.
    #[arg(long, value_name = "DEVICE")]
    pub serial: Option<PathBuf>,
    /// A GPIO line held active while an answer is computed (an LED, or a line to the robot's
    /// controller): CHIP:LINE[:active-low], e.g. `gpiochip0:17` (`gpioinfo` lists lines).
    #[cfg(all(feature = "gpio", target_os = "linux"))]
    #[arg(long, value_name = "CHIP:LINE")]
    pub busy_gpio: Option<String>,
    /// A GPIO input (button, PIR sensor, PLC line), CHIP:LINE[:active-low]. `watch`: each
    /// activation answers one frame (the newest from a camera). `serve`: an activation is a
    /// stop button that cancels the answer being generated.
    #[cfg(all(feature = "gpio", target_os = "linux"))]
    #[arg(long, value_name = "CHIP:LINE")]
    pub trigger_gpio: Option<String>,
}

/// How often a trigger input is sampled while waiting for it.
pub const TRIGGER_POLL: std::time::Duration = std::time::Duration::from_millis(5);

impl RobotArgs {
    /// Opens the serial line, when given.
    pub fn serial(&self, command: &'static str) -> Result<Option<SerialOut>> {
        let Some(path) = &self.serial else { return Ok(None) };
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| format!("--serial {}", path.display()))?;
        Ok(Some(SerialOut { file, seq: 0, command }))
    }

    /// Opens the GPIO lines given (none: every call on them is a no-op).
    pub fn lines(&self) -> Result<IoLines> {
        #[cfg(all(feature = "gpio", target_os = "linux"))]
        {
            Ok(glimpse_targets::gpio::open_lines(self.busy_gpio.as_deref(), self.trigger_gpio.as_deref())?)
        }
        #[cfg(not(all(feature = "gpio", target_os = "linux")))]
        {
            Ok(IoLines::none())
        }
    }
}

/// The serial line answers are framed onto.
pub struct SerialOut {
    file: std::fs::File,
    seq: u16,
    command: &'static str,
}

impl SerialOut {
    /// Writes one frame; a failed write is reported and the command goes on (the answer still
    /// reaches its other outputs).
    pub fn send(&mut self, kind: frame::Kind, text: &str) {
        use std::io::Write;
        let bytes = frame::encode(kind, self.seq, text);
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        if let Err(e) = self.file.write_all(&bytes).and_then(|()| self.file.flush()) {
            eprintln!("glimpse {}: --serial: frame {seq} not written: {e}", self.command);
        }
    }
}
