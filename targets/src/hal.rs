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
}
