//! `vtc-cls` (VTC-CLS, 2412.05819): score each token by the CLS token's attention to it summed
//! over the last layers before the final one, keep the top k in raster order. Needs the
//! `cls_attention` signal, which only CLIP-style encoders with a CLS token have.

use super::{missing, top_k, Chosen, Method, Rows};
use crate::error::Result;

/// Registry entry ([`super::METHODS`]).
pub const SPEC: super::MethodSpec = super::MethodSpec {
    name: "vtc-cls",
    summary: "VTC-CLS: top CLS attention summed over the last layers",
    uses: "cls_attention",
    params: &[],
    acts: super::Acts::AfterEncoder,
    make: || Box::new(VtcCls),
};

/// CLS-attention top-k.
#[derive(Debug, Default, Clone, Copy)]
pub struct VtcCls;

impl Method for VtcCls {
    fn name(&self) -> &'static str {
        "vtc-cls"
    }

    fn choose(&self, rows: &Rows<'_>, k: usize) -> Result<Chosen> {
        let cls = rows.cls().ok_or_else(|| {
            missing(
                "vtc-cls",
                "the CLS attention signal (glimpse_cls_attention)",
                "export the model with `python -m glimpse_export` and its pruning-signals option; encoders without a CLS token (SigLIP) cannot use this method",
            )
        })?;
        Ok(Chosen::keep(top_k(cls.view(), k)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use ndarray::array;

    #[test]
    fn keeps_the_most_attended_in_raster_order() {
        let f = features(5, 2, 1);
        let mut r = rows(&f);
        r.signals.insert("cls_attention", array![[0.1], [0.9], [0.2], [0.8], [0.05]]);
        assert_eq!(VtcCls.choose(&r, 2).unwrap().indices, vec![1, 3]);
    }
}
