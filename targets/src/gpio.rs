//! Linux GPIO character devices (`/dev/gpiochipN`) as the robot's busy and trigger lines,
//! through `linux-embedded-hal`'s `CdevPin` (feature `gpio`, Linux only). The lines are
//! requested plain (no kernel active-low flag): [`Polarity`] is applied by the adapters, so a
//! spec means the same on every HAL.

use linux_embedded_hal::gpio_cdev::{Chip, LineRequestFlags};
use linux_embedded_hal::CdevPin;

use crate::hal::{BusyIndicator, IoLines, LineSpec, Polarity, Trigger};

/// The consumer name the kernel shows for lines Glimpse holds (`gpioinfo`).
pub const CONSUMER: &str = "glimpse";

/// A line that could not be parsed or opened, named by the flag and the value given.
#[derive(Debug, thiserror::Error)]
pub enum GpioError {
    /// The value is not `CHIP:LINE[:active-low]`.
    #[error("{flag} {message}")]
    Parse {
        /// The command-line flag (`--busy-gpio`).
        flag: String,
        /// What is wrong with the value (it quotes the value).
        message: String,
    },
    /// The kernel refused a step.
    #[error("{flag} {spec}: {what} {chip} line {line}: {message}")]
    Line {
        /// The command-line flag (`--busy-gpio`).
        flag: String,
        /// The spec as given.
        spec: String,
        /// The step that failed.
        what: &'static str,
        /// The character device.
        chip: String,
        /// The line offset.
        line: u32,
        /// What the kernel said.
        message: String,
    },
}

fn line_error(flag: &str, given: &str, spec: &LineSpec, what: &'static str, e: &dyn std::fmt::Display) -> GpioError {
    GpioError::Line {
        flag: flag.to_string(),
        spec: given.to_string(),
        what,
        chip: spec.chip.display().to_string(),
        line: spec.line,
        message: e.to_string(),
    }
}

fn request(flag: &str, given: &str, spec: &LineSpec, flags: LineRequestFlags, value: u8) -> Result<CdevPin, GpioError> {
    let err = |what: &'static str, e: &dyn std::fmt::Display| line_error(flag, given, spec, what, e);
    let mut chip = Chip::new(&spec.chip).map_err(|e| err("cannot open", &e))?;
    if spec.line >= chip.num_lines() {
        let n = chip.num_lines();
        return Err(err("no such line on", &format!("the chip has {n} lines (0..{n})")));
    }
    let line = chip.get_line(spec.line).map_err(|e| err("cannot get", &e))?;
    let handle = line.request(flags, value, CONSUMER).map_err(|e| err("cannot request", &e))?;
    CdevPin::new(handle).map_err(|e| err("cannot read the state of", &e))
}

/// Opens `spec` as an output and wraps it as a busy indicator (driven inactive at once).
pub fn open_busy(flag: &str, given: &str, spec: &LineSpec) -> Result<BusyIndicator<CdevPin>, GpioError> {
    let idle = u8::from(spec.polarity == Polarity::ActiveLow);
    let pin = request(flag, given, spec, LineRequestFlags::OUTPUT, idle)?;
    BusyIndicator::new(pin, spec.polarity).map_err(|e| line_error(flag, given, spec, "cannot drive", &e))
}

/// Opens `spec` as an input and wraps it as a trigger.
pub fn open_trigger(flag: &str, given: &str, spec: &LineSpec) -> Result<Trigger<CdevPin>, GpioError> {
    let pin = request(flag, given, spec, LineRequestFlags::INPUT, 0)?;
    Trigger::new(pin, spec.polarity).map_err(|e| line_error(flag, given, spec, "cannot read", &e))
}

/// The [`IoLines`] of a command's `--busy-gpio` / `--trigger-gpio` values (each `Some` opens
/// that line; `None` leaves it out).
pub fn open_lines(busy: Option<&str>, trigger: Option<&str>) -> Result<IoLines, GpioError> {
    let parse = |flag: &str, given: &str| {
        given.parse::<LineSpec>().map_err(|message| GpioError::Parse { flag: flag.to_string(), message })
    };
    let mut lines = IoLines::none();
    if let Some(given) = busy {
        let spec = parse("--busy-gpio", given)?;
        lines = lines.with_busy(format!("--busy-gpio {given}"), open_busy("--busy-gpio", given, &spec)?);
    }
    if let Some(given) = trigger {
        let spec = parse("--trigger-gpio", given)?;
        lines = lines.with_trigger(format!("--trigger-gpio {given}"), open_trigger("--trigger-gpio", given, &spec)?);
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_chip_is_an_error_naming_flag_and_device() {
        let e = open_lines(Some("/nonexistent/gpiochip9:3"), None).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("--busy-gpio /nonexistent/gpiochip9:3: cannot open /nonexistent/gpiochip9 line 3"),
            "{msg}"
        );
        let e = open_lines(None, Some("gpiochip0:x")).unwrap_err();
        assert!(matches!(e, GpioError::Parse { .. }), "{e:?}");
        assert!(e.to_string().contains("line offset \"x\" is not a number"), "{e}");
    }
}
