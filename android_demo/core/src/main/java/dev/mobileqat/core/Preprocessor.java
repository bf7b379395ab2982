package dev.mobileqat.core;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;

/**
 * Decoded pixels to the model's input tensor, exactly as {@code mobileqat device-check} (Python) makes it:
 * transparent pixels composited onto black, RGB or luma ("L": Pillow's (19595 R + 38470 G + 7471 B + 2^15) >> 16),
 * Pillow's bilinear resize to the input size (no aspect ratio kept; none when the size matches), pixels scaled in
 * float32 ("-1..1": x / 127.5 - 1, "0..1": x / 255, "0..255": x, "mean_std": (x - mean) / std), then
 * q = clamp(round_half_away_from_zero(x / scale) + zero_point) in double.
 */
public final class Preprocessor {
    private final Manifest.Input input;
    private final Manifest.Preprocessing prep;

    public Preprocessor(Manifest manifest) {
        this.input = manifest.input;
        this.prep = manifest.preprocessing;
    }

    /**
     * @param argb     (height, width) pixels as 0xAARRGGBB, row major (ImageIO getRGB, Android Bitmap.getPixels)
     * @param hasAlpha whether the decoded image has transparency (alpha then multiplies the colour)
     * @return         the input tensor's bytes (H, W, C) in its dtype, little endian
     */
    public byte[] tensor(int[] argb, int width, int height, boolean hasAlpha) {
        int channels = prep.color.equals("L") ? 1 : 3;
        int[] px = new int[width * height * channels];
        for (int i = 0; i < width * height; i++) {
            int p = argb[i];
            int r = (p >> 16) & 0xff, g = (p >> 8) & 0xff, b = p & 0xff;
            if (hasAlpha) {
                float a = (float) ((p >>> 24) & 0xff) / 255f;
                r = (int) Math.rint((float) r * a);
                g = (int) Math.rint((float) g * a);
                b = (int) Math.rint((float) b * a);
            }
            if (channels == 1) {
                px[i] = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16;
            } else {
                px[3 * i] = r;
                px[3 * i + 1] = g;
                px[3 * i + 2] = b;
            }
        }
        int h = input.height(), w = input.width();
        if (width != w || height != h) {
            if (!prep.resizeMethod.equals("bilinear")) {
                throw new IllegalArgumentException("resize method '" + prep.resizeMethod + "' is not one this app knows");
            }
            px = PillowBilinear.resize(px, width, height, channels, w, h);
        }
        ByteBuffer out = ByteBuffer.allocate(px.length * input.itemsize()).order(ByteOrder.LITTLE_ENDIAN);
        for (int i = 0; i < px.length; i++) {
            float x = scale((float) px[i], i % channels);
            switch (input.dtype) {
                case "float32":
                    out.putFloat(x);
                    break;
                case "int8":
                    out.put((byte) quantize(x, -128, 127));
                    break;
                case "uint8":
                    out.put((byte) quantize(x, 0, 255));
                    break;
                default:
                    throw new IllegalArgumentException("input dtype '" + input.dtype + "' is not one this app knows");
            }
        }
        return out.array();
    }

    private float scale(float x, int channel) {
        switch (prep.pixels) {
            case "-1..1":
                return x / 127.5f - 1f;
            case "0..1":
                return x / 255f;
            case "0..255":
                return x;
            case "mean_std":
                return (x - prep.mean[channel]) / prep.std[channel];
            default:
                throw new IllegalArgumentException("pixel scaling '" + prep.pixels + "' is not one this app knows");
        }
    }

    private int quantize(float x, int lo, int hi) {
        double v = (double) x / input.scale;
        double q = Math.signum(v) * Math.floor(Math.abs(v) + 0.5) + input.zeroPoint;
        return (int) Math.max(lo, Math.min(hi, q));
    }
}
