//! In-process voucher verification.
