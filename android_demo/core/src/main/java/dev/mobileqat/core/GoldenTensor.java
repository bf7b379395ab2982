package dev.mobileqat.core;

import java.io.IOException;
import java.io.InputStream;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.util.Arrays;

/**
 * A golden tensor file ({@code golden/*.bin}): "MQGT", uint32 version 1, uint32 dtype (1 int8, 2 uint8,
 * 3 int16, 4 int32, 5 float32), uint32 rank, rank x uint32 dims, then the elements in C order, little endian.
 * The file is exactly 16 + 4 * rank + prod(dims) * itemsize bytes; anything else is rejected.
 */
public final class GoldenTensor {
    public static final int INT8 = 1, UINT8 = 2, INT16 = 3, INT32 = 4, FLOAT32 = 5;
    private static final int[] ITEMSIZE = {0, 1, 1, 2, 4, 4};

    public final int dtype;
    public final int[] shape;
    /** The elements' raw bytes, little endian, C order. */
    public final byte[] data;

    private GoldenTensor(int dtype, int[] shape, byte[] data) {
        this.dtype = dtype;
        this.shape = shape;
        this.data = data;
    }

    public static GoldenTensor read(InputStream in, String name) throws IOException, PackageException {
        return parse(PackageFiles.readAll(in), name);
    }

    public static GoldenTensor parse(byte[] bytes, String name) throws PackageException {
        if (bytes.length < 16 || bytes[0] != 'M' || bytes[1] != 'Q' || bytes[2] != 'G' || bytes[3] != 'T') {
            throw new PackageException(name + ": not a golden tensor (no MQGT header); re-export the package.");
        }
        ByteBuffer b = ByteBuffer.wrap(bytes).order(ByteOrder.LITTLE_ENDIAN);
        int version = b.getInt(4), dtype = b.getInt(8), rank = b.getInt(12);
        if (version != 1) {
            throw new PackageException(name + ": golden tensor version " + version + ", this reader knows 1.");
        }
        if (dtype < 1 || dtype > 5 || rank < 0 || rank > 8 || bytes.length < 16 + 4 * rank) {
            throw new PackageException(name + ": corrupt golden tensor header (dtype " + dtype + ", rank " + rank + ").");
        }
        int[] shape = new int[rank];
        long count = 1;
        for (int i = 0; i < rank; i++) {
            shape[i] = b.getInt(16 + 4 * i);
            if (shape[i] < 0) {
                throw new PackageException(name + ": corrupt golden tensor header (negative dimension).");
            }
            count *= shape[i];
        }
        long expected = 16L + 4L * rank + count * ITEMSIZE[dtype];
        if (bytes.length != expected) {
            throw new PackageException(name + ": " + bytes.length + " bytes, the header says " + expected
                    + " (truncated or corrupt); re-export the package.");
        }
        return new GoldenTensor(dtype, shape, Arrays.copyOfRange(bytes, 16 + 4 * rank, bytes.length));
    }

    public int itemsize() {
        return ITEMSIZE[dtype];
    }

    /** Number of elements in one row of the first axis (e.g. one image of an (N, H, W, C) tensor). */
    public int rowElements() {
        int n = 1;
        for (int i = 1; i < shape.length; i++) {
            n *= shape[i];
        }
        return n;
    }

    /** Row {@code i} of the first axis as raw bytes. */
    public byte[] rowBytes(int i) {
        int size = rowElements() * itemsize();
        return Arrays.copyOfRange(data, i * size, (i + 1) * size);
    }

    /** Row {@code i} as integers (int8 / uint8 / int16 / int32 codes). */
    public int[] row(int i) {
        return Codes.toInts(rowBytes(i), dtype);
    }
}
