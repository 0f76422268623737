//! The CMOS RTC (in progress).
