//! The CUDA/NCCL backend (feature `cuda`). cudarc opens the CUDA and NCCL
//! libraries at run time, so this compiles on machines without CUDA; every
//! entry point first checks that the libraries are there and reports
//! clearly when they are not (cudarc itself would panic).
//!
//! What exists today is the probe: which GPUs and libraries a machine
//! offers. Running programs on GPUs (a compute and a communication stream
//! per rank, cuBLAS GEMMs, NCCL point-to-point and collectives, a
//! single-GPU mode with one stream set per rank) is still to be built.

use crate::ExecError;

/// What the machine offers.
#[derive(Debug, Clone)]
pub struct CudaInfo {
    /// Number of CUDA devices.
    pub devices: usize,
    /// Name of device 0.
    pub name: String,
}

/// Finds the CUDA driver, NCCL and device 0.
pub fn probe() -> Result<CudaInfo, ExecError> {
    // SAFETY: only checks whether the shared library can be opened.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(ExecError::Setup("no CUDA driver (libcuda) on this machine".into()));
    }
    // SAFETY: as above, for NCCL.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Err(ExecError::Setup("the CUDA driver is here but NCCL (libnccl) is not".into()));
    }
    let devices = cudarc::driver::CudaContext::device_count()
        .map_err(|e| ExecError::Setup(format!("cannot count CUDA devices: {e:?}")))?;
    if devices < 1 {
        return Err(ExecError::Setup("the CUDA driver reports no devices".into()));
    }
    let context = cudarc::driver::CudaContext::new(0)
        .map_err(|e| ExecError::Setup(format!("cannot open CUDA device 0: {e:?}")))?;
    let name = context.name().map_err(|e| ExecError::Setup(format!("cannot read the device's name: {e:?}")))?;
    Ok(CudaInfo { devices: devices as usize, name })
}
