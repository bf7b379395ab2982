package dev.mobileqat.core;

/**
 * Pillow's {@code Image.resize(size, Image.BILINEAR)} for 8-bit images, integer for integer (a port of
 * libImaging/Resample.c: a triangle filter widened by the scale when reducing, coefficients rounded to 22-bit
 * fixed point, a horizontal pass over the rows the vertical pass needs, then the vertical pass, each rounding
 * half up and clamping to 0..255). The Android side must not use Bitmap.createScaledBitmap, whose filter differs.
 */
public final class PillowBilinear {
    private static final int PRECISION_BITS = 32 - 8 - 2;

    private PillowBilinear() {
    }

    /** Coefficients of one axis: bounds[2 * i] first input index, bounds[2 * i + 1] count, k[i * ksize + j]. */
    private static final class Coeffs {
        int ksize;
        int[] bounds;
        int[] k;
    }

    private static double filter(double x) {
        if (x < 0.0) x = -x;
        return x < 1.0 ? 1.0 - x : 0.0;
    }

    private static Coeffs precompute(int inSize, int outSize) {
        double support = 1.0; // bilinear
        double scale = (double) inSize / outSize;
        double filterscale = Math.max(scale, 1.0);
        support = support * filterscale;
        int ksize = (int) Math.ceil(support) * 2 + 1;
        double[] kk = new double[outSize * ksize];
        int[] bounds = new int[outSize * 2];
        for (int xx = 0; xx < outSize; xx++) {
            double center = (xx + 0.5) * scale;
            double ww = 0.0;
            double ss = 1.0 / filterscale;
            int xmin = (int) (center - support + 0.5);
            if (xmin < 0) xmin = 0;
            int xmax = (int) (center + support + 0.5);
            if (xmax > inSize) xmax = inSize;
            xmax -= xmin;
            for (int x = 0; x < xmax; x++) {
                double w = filter((x + xmin - center + 0.5) * ss);
                kk[xx * ksize + x] = w;
                ww += w;
            }
            for (int x = 0; x < xmax; x++) {
                if (ww != 0.0) kk[xx * ksize + x] /= ww;
            }
            bounds[xx * 2] = xmin;
            bounds[xx * 2 + 1] = xmax;
        }
        Coeffs c = new Coeffs();
        c.ksize = ksize;
        c.bounds = bounds;
        c.k = new int[kk.length];
        for (int i = 0; i < kk.length; i++) {
            c.k[i] = kk[i] < 0 ? (int) (-0.5 + kk[i] * (1 << PRECISION_BITS)) : (int) (0.5 + kk[i] * (1 << PRECISION_BITS));
        }
        return c;
    }

    private static int clip8(int in) {
        if (in >= (1 << PRECISION_BITS << 8)) return 255;
        if (in <= 0) return 0;
        return in >> PRECISION_BITS;
    }

    /**
     * Resize interleaved 8-bit pixels.
     *
     * @param src      (height, width, channels) values 0..255, row major
     * @return         (outHeight, outWidth, channels) values 0..255
     */
    public static int[] resize(int[] src, int width, int height, int channels, int outWidth, int outHeight) {
        if (width == outWidth && height == outHeight) return src.clone();
        Coeffs h = precompute(width, outWidth);
        Coeffs v = precompute(height, outHeight);
        int[] img = src;
        int w = width, rows = height;
        int[] vbounds = v.bounds.clone();
        if (outWidth != width) {
            int first = vbounds[0];
            int last = vbounds[outHeight * 2 - 2] + vbounds[outHeight * 2 - 1];
            for (int i = 0; i < outHeight; i++) vbounds[i * 2] -= first;
            rows = last - first;
            int[] tmp = new int[rows * outWidth * channels];
            for (int yy = 0; yy < rows; yy++) {
                int base = (yy + first) * width * channels;
                for (int xx = 0; xx < outWidth; xx++) {
                    int xmin = h.bounds[xx * 2], xmax = h.bounds[xx * 2 + 1], k0 = xx * h.ksize;
                    for (int c = 0; c < channels; c++) {
                        int ss = 1 << (PRECISION_BITS - 1);
                        for (int x = 0; x < xmax; x++) ss += img[base + (x + xmin) * channels + c] * h.k[k0 + x];
                        tmp[(yy * outWidth + xx) * channels + c] = clip8(ss);
                    }
                }
            }
            img = tmp;
            w = outWidth;
        }
        if (outHeight == height && outWidth != width) return img;
        int[] out = new int[outHeight * w * channels];
        for (int yy = 0; yy < outHeight; yy++) {
            int ymin = vbounds[yy * 2], ymax = vbounds[yy * 2 + 1], k0 = yy * v.ksize;
            for (int xx = 0; xx < w; xx++) {
                for (int c = 0; c < channels; c++) {
                    int ss = 1 << (PRECISION_BITS - 1);
                    for (int y = 0; y < ymax; y++) ss += img[((y + ymin) * w + xx) * channels + c] * v.k[k0 + y];
                    out[(yy * w + xx) * channels + c] = clip8(ss);
                }
            }
        }
        return out;
    }
}
