//! Where `glimpse watch` gets its frames: a folder of images (sorted by name), a video file or
//! a V4L2 camera. Video and camera frames come from an `ffmpeg` subprocess writing PPM images
//! to a pipe, read one at a time with their size checked against the image limits before any
//! buffer is allocated.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};

use anyhow::{bail, Context, Result};
use glimpse_runtime::preprocess::ImageLimits;
use image::RgbImage;

/// A named frame.
pub struct Frame {
    /// File name, or `frame N` for video and camera frames.
    pub name: String,
    pub image: RgbImage,
}

/// A source of frames, read in order.
pub enum Source {
    /// Image files, in name order.
    Files { paths: Vec<PathBuf>, next: usize, limits: ImageLimits },
    /// PPM frames from an ffmpeg process, every one in order (a video file).
    Ffmpeg { child: Child, out: BufReader<ChildStdout>, next: usize, limits: ImageLimits, what: String },
    /// The newest PPM frame of a process read by a thread as fast as it writes (a camera: a
    /// frame taken after a slow answer or a trigger is the present one, not one queued in the
    /// pipe); frames nobody took are dropped.
    Live { child: Child, latest: Arc<Latest>, what: String },
}

/// The newest frame of a live source and how the reader ended.
#[derive(Default)]
pub struct Latest {
    slot: Mutex<Slot>,
    ready: Condvar,
}

#[derive(Default)]
struct Slot {
    /// The newest frame not yet taken, with its number.
    frame: Option<(usize, RgbImage)>,
    /// Set when the stream ended: `Err` with the reason when it broke.
    end: Option<std::result::Result<(), String>>,
}

impl Latest {
    /// Reads frames from `out` into the slot until the end of the stream or an error.
    fn fill(&self, mut out: impl BufRead, limits: ImageLimits) {
        let mut n = 0;
        let end = loop {
            match read_ppm(&mut out, limits) {
                Ok(Some(image)) => {
                    if let Ok(mut slot) = self.slot.lock() {
                        slot.frame = Some((n, image));
                    }
                    self.ready.notify_all();
                    n += 1;
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(format!("frame {n}: {e:#}")),
            }
        };
        if let Ok(mut slot) = self.slot.lock() {
            slot.end = Some(end);
        }
        self.ready.notify_all();
    }

    /// Waits for a frame newer than the last taken; `Ok(None)` once the stream ended with
    /// none left.
    fn take(&self) -> std::result::Result<Option<(usize, RgbImage)>, String> {
        let mut slot = self.slot.lock().map_err(|_| "the frame reader panicked".to_string())?;
        loop {
            if let Some(frame) = slot.frame.take() {
                return Ok(Some(frame));
            }
            if let Some(end) = &slot.end {
                return end.clone().map(|()| None);
            }
            slot = self.ready.wait(slot).map_err(|_| "the frame reader panicked".to_string())?;
        }
    }
}

/// Image files of a folder, sorted by name (PNG, JPEG).
pub fn folder_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading the frames folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        })
        .collect();
    paths.sort();
    if paths.is_empty() {
        bail!("{} holds no PNG or JPEG frames", dir.display());
    }
    Ok(paths)
}

/// The ffmpeg arguments that decode `input` (a file, or a V4L2 device when `camera`) to PPM
/// frames on standard output, at `fps` frames per second when given.
pub fn ffmpeg_args(input: &Path, camera: bool, fps: Option<f64>) -> Vec<String> {
    let mut a: Vec<String> = ["-hide_banner", "-loglevel", "error", "-nostdin"].map(String::from).to_vec();
    if camera {
        a.extend(["-f", "v4l2"].map(String::from));
    }
    a.push("-i".into());
    a.push(input.display().to_string());
    if let Some(fps) = fps {
        a.push("-vf".into());
        a.push(format!("fps={fps}"));
    }
    a.extend(["-f", "image2pipe", "-c:v", "ppm", "-"].map(String::from));
    a
}

impl Source {
    /// Frames from image files.
    pub fn files(paths: Vec<PathBuf>, limits: ImageLimits) -> Self {
        Source::Files { paths, next: 0, limits }
    }

    /// Frames decoded by `ffmpeg` from a video file or camera device.
    pub fn ffmpeg(ffmpeg: &Path, input: &Path, camera: bool, fps: Option<f64>, limits: ImageLimits) -> Result<Self> {
        if !camera && !input.is_file() {
            bail!("video {} is not a file", input.display());
        }
        let mut child = Command::new(ffmpeg)
            .args(ffmpeg_args(input, camera, fps))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {} (install ffmpeg or give --ffmpeg PATH)", ffmpeg.display()))?;
        let out = child.stdout.take().context("ffmpeg's standard output")?;
        let what = input.display().to_string();
        if camera {
            return Ok(Source::live(child, BufReader::new(out), limits, what));
        }
        Ok(Source::Ffmpeg { child, out: BufReader::new(out), next: 0, limits, what })
    }

    /// The newest-frame source over `child`'s PPM output `out`.
    fn live(child: Child, out: BufReader<ChildStdout>, limits: ImageLimits, what: String) -> Self {
        let latest = Arc::new(Latest::default());
        let filler = latest.clone();
        // detached: it ends when the child's output does (the child is killed on drop)
        std::thread::spawn(move || filler.fill(out, limits));
        Source::Live { child, latest, what }
    }

    /// The next frame, `None` at the end.
    pub fn next_frame(&mut self) -> Result<Option<Frame>> {
        match self {
            Source::Files { paths, next, limits } => {
                let Some(path) = paths.get(*next) else { return Ok(None) };
                *next += 1;
                let image = glimpse_runtime::preprocess::load_image(path, *limits)
                    .with_context(|| format!("reading frame {}", path.display()))?;
                let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into());
                Ok(Some(Frame { name, image }))
            }
            Source::Ffmpeg { child, out, next, limits, what } => {
                match read_ppm(out, *limits)
                    .with_context(|| format!("reading frame {} of {what} from ffmpeg", *next))?
                {
                    Some(image) => {
                        *next += 1;
                        Ok(Some(Frame { name: format!("frame {}", *next - 1), image }))
                    }
                    None => {
                        let status = child.wait().context("waiting for ffmpeg")?;
                        if !status.success() {
                            bail!("ffmpeg failed on {what} ({status}); its messages are above");
                        }
                        Ok(None)
                    }
                }
            }
            Source::Live { child, latest, what } => match latest.take() {
                Ok(Some((n, image))) => Ok(Some(Frame { name: format!("frame {n}"), image })),
                Ok(None) => {
                    let status = child.wait().context("waiting for ffmpeg")?;
                    if !status.success() {
                        bail!("ffmpeg failed on {what} ({status}); its messages are above");
                    }
                    Ok(None)
                }
                Err(e) => bail!("reading {what} from ffmpeg: {e}"),
            },
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        if let Source::Ffmpeg { child, .. } | Source::Live { child, .. } = self {
            // a camera never ends by itself
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One binary PPM (P6, 8-bit) image from `r`; `None` at a clean end of stream. The header's
/// size is checked against `limits` before the pixel buffer is allocated.
pub fn read_ppm(r: &mut impl BufRead, limits: ImageLimits) -> Result<Option<RgbImage>> {
    if r.fill_buf()?.is_empty() {
        return Ok(None);
    }
    let magic = header_token(r)?;
    if magic != "P6" {
        bail!("not a binary PPM frame (starts with {magic:?})");
    }
    let mut num = |what: &str| -> Result<u64> {
        let t = header_token(r)?;
        t.parse::<u64>().with_context(|| format!("PPM {what} {t:?} is not a number"))
    };
    let (w, h, max) = (num("width")?, num("height")?, num("maximum value")?);
    if max != 255 {
        bail!("PPM maximum value {max}: only 8-bit frames (255) are read");
    }
    if w == 0 || h == 0 || w > u64::from(limits.max_side) || h > u64::from(limits.max_side) {
        bail!("frame of {w} x {h} pixels: each side must be 1..={}", limits.max_side);
    }
    if w * h > limits.max_pixels {
        bail!("frame of {w} x {h} = {} pixels is over the limit of {} (--max-image-pixels)", w * h, limits.max_pixels);
    }
    let mut data = vec![0u8; (w * h * 3) as usize];
    r.read_exact(&mut data).context("the frame ended early")?;
    RgbImage::from_raw(w as u32, h as u32, data).map(Some).context("PPM frame size")
}

/// The next whitespace-separated header token; the single whitespace byte after it is
/// consumed (the one before the pixel data). `#` comments are skipped.
fn header_token(r: &mut impl BufRead) -> Result<String> {
    let mut tok = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if r.read(&mut byte)? == 0 {
            bail!("the PPM header ended early");
        }
        match byte[0] {
            b'#' if tok.is_empty() => {
                let mut skip = Vec::new();
                r.read_until(b'\n', &mut skip)?;
            }
            b if b.is_ascii_whitespace() => {
                if !tok.is_empty() {
                    break;
                }
            }
            b => {
                if tok.len() >= 20 {
                    bail!("a PPM header field is longer than 20 bytes");
                }
                tok.push(b);
            }
        }
    }
    Ok(String::from_utf8_lossy(&tok).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ppm(w: u32, h: u32) -> Vec<u8> {
        let mut v = format!("P6\n# made by a test\n{w} {h}\n255\n").into_bytes();
        v.extend((0..w * h * 3).map(|i| (i % 251) as u8));
        v
    }

    #[test]
    fn frames_are_read_one_after_another() {
        let mut bytes = ppm(3, 2);
        bytes.extend(ppm(2, 2));
        let mut r = std::io::Cursor::new(bytes);
        let a = read_ppm(&mut r, ImageLimits::default()).unwrap().unwrap();
        let b = read_ppm(&mut r, ImageLimits::default()).unwrap().unwrap();
        assert_eq!((a.width(), a.height(), b.width()), (3, 2, 2));
        assert_eq!(a.get_pixel(1, 0).0, [3, 4, 5]);
        assert!(read_ppm(&mut r, ImageLimits::default()).unwrap().is_none());
    }

    #[test]
    fn bad_frames_are_errors_before_allocating() {
        let limits = ImageLimits { max_pixels: 100, ..ImageLimits::default() };
        let huge = b"P6 100000 100000 255 ".to_vec();
        let e = read_ppm(&mut std::io::Cursor::new(huge), ImageLimits::default()).unwrap_err();
        assert!(e.to_string().contains("each side") || e.to_string().contains("limit"), "{e}");
        let e = read_ppm(&mut std::io::Cursor::new(ppm(20, 20)), limits).unwrap_err();
        assert!(e.to_string().contains("over the limit"), "{e}");
        let e = read_ppm(&mut std::io::Cursor::new(b"P5 2 2 255 ....".to_vec()), limits).unwrap_err();
        assert!(e.to_string().contains("not a binary PPM"), "{e}");
        let mut short = ppm(3, 3);
        short.truncate(20);
        let e = read_ppm(&mut std::io::Cursor::new(short), limits).unwrap_err();
        assert!(format!("{e:#}").contains("ended early"), "{e:#}");
    }

    #[test]
    fn camera_and_video_arguments() {
        let a = ffmpeg_args(Path::new("/dev/video0"), true, None).join(" ");
        assert!(a.contains("-f v4l2 -i /dev/video0") && a.ends_with("-f image2pipe -c:v ppm -"), "{a}");
        let v = ffmpeg_args(Path::new("clip.mp4"), false, Some(2.0)).join(" ");
        assert!(v.contains("-i clip.mp4 -vf fps=2") && !v.contains("v4l2"), "{v}");
    }

    #[test]
    fn a_live_source_hands_out_the_newest_frames_in_order_then_ends() {
        let mut all = Vec::new();
        for k in 1..=4u32 {
            all.extend(ppm(k, 2));
        }
        let file = std::env::temp_dir().join(format!("glimpse-live-source-{}.ppm", std::process::id()));
        std::fs::write(&file, &all).unwrap();
        let mut child = Command::new("cat").arg(&file).stdout(Stdio::piped()).spawn().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut source = Source::live(child, out, ImageLimits::default(), "test".into());
        let mut widths = Vec::new();
        while let Some(frame) = source.next_frame().unwrap() {
            widths.push(frame.image.width());
        }
        // some frames may be dropped, never reordered, and the last one is always handed out
        assert!(widths.windows(2).all(|w| w[0] < w[1]), "{widths:?}");
        assert_eq!(widths.last(), Some(&4));

        // a broken stream is an error naming the frame
        std::fs::write(&file, b"P6 2 2 255\nab").unwrap();
        let mut child = Command::new("cat").arg(&file).stdout(Stdio::piped()).spawn().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut source = Source::live(child, out, ImageLimits::default(), "test".into());
        let e = source.next_frame().err().expect("a broken stream is an error").to_string();
        let _ = std::fs::remove_file(&file);
        assert!(e.contains("frame 0") && e.contains("ended early"), "{e}");
    }
}
