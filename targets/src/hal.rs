//! embedded-hal 1.0 adapters for robot apps: a status LED (or line to a microcontroller) that
//! says "inference busy", and a trigger input (button, PIR sensor, PLC line) that starts one.
//!
//! Both are generic over `embedded_hal::digital` pins, so they work with any HAL crate
//! (`linux-embedded-hal` GPIO character devices, `rppal` on the Pi, a Jetson GPIO wrapper).

use embedded_hal::digital::{InputPin, OutputPin};

/// Electrical level that means "active".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Polarity {
    /// High = active.
    #[default]
    ActiveHigh,
    /// Low = active (LEDs wired to 3V3, pull-up buttons).
    ActiveLow,
}

/// An output that is active while inference runs.
#[derive(Debug)]
pub struct BusyIndicator<P> {
    pin: P,
    polarity: Polarity,
    busy: bool,
}

impl<P: OutputPin> BusyIndicator<P> {
    /// Wraps `pin` and drives it inactive.
    pub fn new(pin: P, polarity: Polarity) -> Result<Self, P::Error> {
        let mut this = BusyIndicator { pin, polarity, busy: true };
        this.set_busy(false)?;
        Ok(this)
    }

    /// Drives the pin to the active (`true`) or inactive level.
    pub fn set_busy(&mut self, busy: bool) -> Result<(), P::Error> {
        if busy == (self.polarity == Polarity::ActiveHigh) {
            self.pin.set_high()?;
        } else {
            self.pin.set_low()?;
        }
        self.busy = busy;
        Ok(())
    }

    /// Last level set.
    pub fn is_busy(&self) -> bool {
        self.busy
    }

    /// Runs `work` with the indicator active, and inactive again afterwards (even when `work`
    /// returns an error value; `work`'s result is passed through). A panic inside `work` leaves
    /// the indicator active, which is the honest state for a crashed inference.
    pub fn while_busy<R>(&mut self, work: impl FnOnce() -> R) -> Result<R, P::Error> {
        self.set_busy(true)?;
        let out = work();
        self.set_busy(false)?;
        Ok(out)
    }

    /// Gives the pin back.
    pub fn release(self) -> P {
        self.pin
    }
}

/// An input polled for activations: reports each inactive→active edge once, so holding a
/// button down starts one inference, not one per poll.
#[derive(Debug)]
pub struct Trigger<P> {
    pin: P,
    polarity: Polarity,
    was_active: bool,
}

impl<P: InputPin> Trigger<P> {
    /// Wraps `pin`. A trigger already active at start-up does not fire until released and
    /// pressed again.
    pub fn new(mut pin: P, polarity: Polarity) -> Result<Self, P::Error> {
        let was_active = level_active(&mut pin, polarity)?;
        Ok(Trigger { pin, polarity, was_active })
    }

    /// Whether the input is active now.
    pub fn is_active(&mut self) -> Result<bool, P::Error> {
        level_active(&mut self.pin, self.polarity)
    }

    /// Samples the pin; `true` exactly once per activation (rising edge of "active").
    pub fn poll(&mut self) -> Result<bool, P::Error> {
        let active = self.is_active()?;
        let fired = active && !self.was_active;
        self.was_active = active;
        Ok(fired)
    }

    /// Gives the pin back.
    pub fn release(self) -> P {
        self.pin
    }
}

fn level_active<P: InputPin>(pin: &mut P, polarity: Polarity) -> Result<bool, P::Error> {
    Ok(match polarity {
        Polarity::ActiveHigh => pin.is_high()?,
        Polarity::ActiveLow => pin.is_low()?,
    })
}

/// A fault on one of the robot's lines, named by the line (`--busy-gpio gpiochip0:17`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{line}: {message}")]
pub struct LineError {
    /// Which line: the flag and its value as the user gave them.
    pub line: String,
    /// What the pin driver said.
    pub message: String,
}

type BusyFn = Box<dyn FnMut(bool) -> Result<(), LineError> + Send>;
type TriggerFn = Box<dyn FnMut() -> Result<bool, LineError> + Send>;

/// The I/O lines a command drives: an optional busy indicator and an optional trigger input,
/// over any embedded-hal pins (GPIO character devices in `glimpse watch` / `serve`, mocks in
/// tests). A command without lines gets [`IoLines::none`], on which every call is a no-op.
#[derive(Default)]
pub struct IoLines {
    busy: Option<BusyFn>,
    trigger: Option<TriggerFn>,
}

impl std::fmt::Debug for IoLines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoLines").field("busy", &self.busy.is_some()).field("trigger", &self.trigger.is_some()).finish()
    }
}

impl IoLines {
    /// No lines.
    pub fn none() -> Self {
        Self::default()
    }

    /// Adds a busy indicator; `name` says which line it is in errors.
    pub fn with_busy<P>(mut self, name: impl Into<String>, mut busy: BusyIndicator<P>) -> Self
    where
        P: OutputPin + Send + 'static,
    {
        let name = name.into();
        self.busy = Some(Box::new(move |on| busy.set_busy(on).map_err(|e| line_error(&name, &e))));
        self
    }

    /// Adds a trigger input; `name` says which line it is in errors.
    pub fn with_trigger<P>(mut self, name: impl Into<String>, mut trigger: Trigger<P>) -> Self
    where
        P: InputPin + Send + 'static,
    {
        let name = name.into();
        self.trigger = Some(Box::new(move || trigger.poll().map_err(|e| line_error(&name, &e))));
        self
    }

    /// Whether a trigger input is attached.
    pub fn has_trigger(&self) -> bool {
        self.trigger.is_some()
    }

    /// Drives the busy indicator, when there is one.
    pub fn set_busy(&mut self, busy: bool) -> Result<(), LineError> {
        match &mut self.busy {
            Some(set) => set(busy),
            None => Ok(()),
        }
    }

    /// Samples the trigger once: `true` once per activation; `false` without a trigger.
    pub fn poll_trigger(&mut self) -> Result<bool, LineError> {
        match &mut self.trigger {
            Some(poll) => poll(),
            None => Ok(false),
        }
    }

    /// Waits for the next activation of the trigger, sampling it every `interval`: `true` when
    /// it fired, `false` when `stop` said to give up first. Without a trigger it returns `true`
    /// at once, so a loop gated on it runs freely.
    pub fn wait_trigger(&mut self, interval: std::time::Duration, stop: impl Fn() -> bool) -> Result<bool, LineError> {
        let Some(poll) = &mut self.trigger else { return Ok(true) };
        loop {
            if poll()? {
                return Ok(true);
            }
            if stop() {
                return Ok(false);
            }
            std::thread::sleep(interval);
        }
    }
}

fn line_error(name: &str, e: &impl embedded_hal::digital::Error) -> LineError {
    LineError { line: name.to_string(), message: format!("{:?} ({e:?})", e.kind()) }
}

/// Where a line is: `CHIP:LINE[:active-low]`, CHIP a GPIO character device (`/dev/gpiochip0`)
/// or its name (`gpiochip0`), LINE the line offset on it (`gpioinfo` lists them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineSpec {
    /// The character device.
    pub chip: std::path::PathBuf,
    /// Line offset on the chip.
    pub line: u32,
    /// Which level means active.
    pub polarity: Polarity,
}

impl std::str::FromStr for LineSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("{s:?}: {why} (expected CHIP:LINE[:active-low], e.g. gpiochip0:17)");
        let mut parts = s.split(':');
        let chip = parts.next().filter(|c| !c.is_empty()).ok_or_else(|| bad("no chip"))?;
        let line = parts.next().ok_or_else(|| bad("no line offset"))?;
        let line: u32 = line.parse().map_err(|_| bad(&format!("line offset {line:?} is not a number")))?;
        let polarity = match parts.next() {
            None | Some("active-high") => Polarity::ActiveHigh,
            Some("active-low") => Polarity::ActiveLow,
            Some(other) => return Err(bad(&format!("{other:?} is not active-high or active-low"))),
        };
        if parts.next().is_some() {
            return Err(bad("too many fields"));
        }
        let chip = if chip.contains('/') { chip.into() } else { std::path::Path::new("/dev").join(chip) };
        Ok(LineSpec { chip, line, polarity })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_hal::digital::{Error, ErrorKind, ErrorType};
    use std::cell::RefCell;
    use std::collections::VecDeque;
    use std::rc::Rc;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct PinFault;
    impl Error for PinFault {
        fn kind(&self) -> ErrorKind {
            ErrorKind::Other
        }
    }

    /// Records output levels; plays back scripted input levels (the last one repeats).
    #[derive(Debug, Default, Clone)]
    struct MockPin {
        writes: Rc<RefCell<Vec<bool>>>,
        reads: Rc<RefCell<VecDeque<bool>>>,
        fail: bool,
    }
    impl ErrorType for MockPin {
        type Error = PinFault;
    }
    impl OutputPin for MockPin {
        fn set_low(&mut self) -> Result<(), PinFault> {
            if self.fail {
                return Err(PinFault);
            }
            self.writes.borrow_mut().push(false);
            Ok(())
        }
        fn set_high(&mut self) -> Result<(), PinFault> {
            if self.fail {
                return Err(PinFault);
            }
            self.writes.borrow_mut().push(true);
            Ok(())
        }
    }
    impl InputPin for MockPin {
        fn is_high(&mut self) -> Result<bool, PinFault> {
            if self.fail {
                return Err(PinFault);
            }
            let mut r = self.reads.borrow_mut();
            let level = r.front().copied().unwrap_or(false);
            if r.len() > 1 {
                r.pop_front();
            }
            Ok(level)
        }
        fn is_low(&mut self) -> Result<bool, PinFault> {
            self.is_high().map(|h| !h)
        }
    }

    #[test]
    fn busy_indicator_drives_levels_for_both_polarities() {
        let pin = MockPin::default();
        let log = pin.writes.clone();
        let mut led = BusyIndicator::new(pin, Polarity::ActiveHigh).unwrap();
        let answer = led.while_busy(|| 42).unwrap();
        assert_eq!(answer, 42);
        assert_eq!(*log.borrow(), [false, true, false]);
        assert!(!led.is_busy());

        let pin = MockPin::default();
        let log = pin.writes.clone();
        let mut led = BusyIndicator::new(pin, Polarity::ActiveLow).unwrap();
        led.set_busy(true).unwrap();
        assert!(led.is_busy());
        assert_eq!(*log.borrow(), [true, false]);
    }

    #[test]
    fn trigger_fires_once_per_press() {
        let pin = MockPin::default();
        // start released, press for 3 polls, release, press again.
        pin.reads.borrow_mut().extend([false, false, true, true, true, false, true]);
        let mut t = Trigger::new(pin, Polarity::ActiveHigh).unwrap();
        let fired: Vec<bool> = (0..6).map(|_| t.poll().unwrap()).collect();
        assert_eq!(fired, [false, true, false, false, false, true]);

        // Active-low button held at start-up does not fire until pressed again.
        let pin = MockPin::default();
        pin.reads.borrow_mut().extend([false, false, true, false]);
        let mut t = Trigger::new(pin, Polarity::ActiveLow).unwrap();
        let fired: Vec<bool> = (0..3).map(|_| t.poll().unwrap()).collect();
        assert_eq!(fired, [false, false, true]);
    }

    #[test]
    fn pin_errors_propagate() {
        let pin = MockPin { fail: true, ..MockPin::default() };
        assert_eq!(BusyIndicator::new(pin.clone(), Polarity::ActiveHigh).unwrap_err(), PinFault);
        assert_eq!(Trigger::new(pin, Polarity::ActiveHigh).unwrap_err().kind(), ErrorKind::Other);
    }

    mod with_embedded_hal_mock {
        use super::super::*;
        use embedded_hal_mock::eh1::digital::{Mock, State, Transaction as T};
        use embedded_hal_mock::eh1::MockError;
        use std::cell::Cell;
        use std::time::Duration;

        #[test]
        fn io_lines_drive_busy_and_wait_for_a_trigger_edge() {
            let led = Mock::new(&[T::set(State::Low), T::set(State::High), T::set(State::Low)]);
            // start-up sample, then released, released, pressed
            let button = Mock::new(&[T::get(State::Low), T::get(State::Low), T::get(State::Low), T::get(State::High)]);
            let (mut led_done, mut button_done) = (led.clone(), button.clone());
            let mut lines = IoLines::none()
                .with_busy("busy", BusyIndicator::new(led, Polarity::ActiveHigh).unwrap())
                .with_trigger("trigger", Trigger::new(button, Polarity::ActiveHigh).unwrap());
            assert!(lines.has_trigger());
            assert!(lines.wait_trigger(Duration::from_millis(1), || false).unwrap());
            lines.set_busy(true).unwrap();
            lines.set_busy(false).unwrap();
            drop(lines);
            led_done.done();
            button_done.done();
        }

        #[test]
        fn waiting_gives_up_when_told_and_no_trigger_means_go() {
            let button = Mock::new(&[T::get(State::High), T::get(State::High), T::get(State::High)]);
            let mut done = button.clone();
            // held at start-up: does not fire while held
            let mut lines = IoLines::none().with_trigger("t", Trigger::new(button, Polarity::ActiveHigh).unwrap());
            let polls = Cell::new(0);
            let fired = lines
                .wait_trigger(Duration::from_millis(1), || {
                    polls.set(polls.get() + 1);
                    polls.get() >= 2
                })
                .unwrap();
            assert!(!fired);
            drop(lines);
            done.done();

            let mut free = IoLines::none();
            assert!(!free.has_trigger());
            assert!(free.wait_trigger(Duration::from_secs(3600), || false).unwrap());
            assert!(!free.poll_trigger().unwrap());
            free.set_busy(true).unwrap();
        }

        #[test]
        fn pin_faults_name_the_line() {
            let led = Mock::new(&[
                T::set(State::High),
                T::set(State::Low).with_error(MockError::Io(std::io::ErrorKind::NotConnected)),
            ]);
            let mut done = led.clone();
            let mut lines = IoLines::none().with_busy(
                "--busy-gpio gpiochip0:17:active-low",
                BusyIndicator::new(led, Polarity::ActiveLow).unwrap(),
            );
            let e = lines.set_busy(true).unwrap_err();
            assert_eq!(e.line, "--busy-gpio gpiochip0:17:active-low");
            assert!(e.to_string().starts_with("--busy-gpio gpiochip0:17:active-low: "), "{e}");
            drop(lines);
            done.done();
        }
    }

    #[test]
    fn line_specs_parse_or_say_what_is_wrong() {
        let s: LineSpec = "gpiochip0:17".parse().unwrap();
        assert_eq!(s, LineSpec { chip: "/dev/gpiochip0".into(), line: 17, polarity: Polarity::ActiveHigh });
        let s: LineSpec = "/dev/gpiochip4:3:active-low".parse().unwrap();
        assert_eq!(s, LineSpec { chip: "/dev/gpiochip4".into(), line: 3, polarity: Polarity::ActiveLow });
        for (bad, why) in [
            ("gpiochip0", "no line offset"),
            (":3", "no chip"),
            ("gpiochip0:-1", "is not a number"),
            ("gpiochip0:3:inverted", "is not active-high or active-low"),
            ("gpiochip0:3:active-low:x", "too many fields"),
        ] {
            let e = bad.parse::<LineSpec>().unwrap_err();
            assert!(e.contains(why) && e.contains(bad), "{bad}: {e}");
        }
    }
}
