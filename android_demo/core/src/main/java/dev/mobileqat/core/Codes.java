package dev.mobileqat.core;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;

/** Integer tensor codes: raw little-endian bytes to ints and back, top-k, dequantization. */
public final class Codes {
    private Codes() {
    }

    public static int[] toInts(byte[] raw, int dtype) {
        ByteBuffer b = ByteBuffer.wrap(raw).order(ByteOrder.LITTLE_ENDIAN);
        switch (dtype) {
            case GoldenTensor.INT8: {
                int[] out = new int[raw.length];
                for (int i = 0; i < raw.length; i++) out[i] = raw[i];
                return out;
            }
            case GoldenTensor.UINT8: {
                int[] out = new int[raw.length];
                for (int i = 0; i < raw.length; i++) out[i] = raw[i] & 0xff;
                return out;
            }
            case GoldenTensor.INT16: {
                int[] out = new int[raw.length / 2];
                for (int i = 0; i < out.length; i++) out[i] = b.getShort(2 * i);
                return out;
            }
            case GoldenTensor.INT32: {
                int[] out = new int[raw.length / 4];
                for (int i = 0; i < out.length; i++) out[i] = b.getInt(4 * i);
                return out;
            }
            default:
                throw new IllegalArgumentException("dtype " + dtype + " holds no integer codes");
        }
    }

    /** Indices of the {@code k} largest codes, largest first (ties: lower index first, as numpy's argsort). */
    public static int[] topK(int[] codes, int k) {
        Integer[] idx = new Integer[codes.length];
        for (int i = 0; i < idx.length; i++) idx[i] = i;
        java.util.Arrays.sort(idx, (a, c) -> codes[c] != codes[a] ? Integer.compare(codes[c], codes[a]) : Integer.compare(a, c));
        int[] out = new int[Math.min(k, codes.length)];
        for (int i = 0; i < out.length; i++) out[i] = idx[i];
        return out;
    }

    /** value = (q - zeroPoint) * scale. */
    public static double dequantize(int q, double scale, int zeroPoint) {
        return (q - zeroPoint) * scale;
    }
}
