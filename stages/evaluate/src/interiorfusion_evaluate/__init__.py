"""InteriorFusion stage 5: evaluation. So far the pure metric functions (`metrics`: surface Chamfer and F-score,
PSNR / SSIM / LPIPS, layout IoU, 3D detection mAP, scale error, and the seed's targets); the stage comes later."""
