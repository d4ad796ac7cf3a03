"""Quality metrics (Ray-free): SSIM/PSNR, FID's Inception-v3, LMD, SyncNet v2 (LSE-C/LSE-D)."""
