package dev.mobileqat.core;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;

/**
 * The package check that {@code mobileqat device-check} runs, for an app: every file's size and sha256, the
 * golden PNGs preprocessed here against the stored input tensors (byte for byte), and the stored output codes
 * against a runtime's (bit for bit: identical images, top-1 agreement, max LSB, first difference, latency).
 */
public final class GoldenCheck {
    /** Runs one input tensor (raw bytes, batch 1) and returns the output tensor's raw bytes. */
    public interface Runner {
        byte[] run(byte[] input) throws Exception;
    }

    /** Decodes a PNG into 0xAARRGGBB pixels. */
    public interface Decoder {
        Image decode(byte[] png) throws IOException;
    }

    /** Decoded pixels, row major. */
    public static final class Image {
        public final int[] argb;
        public final int width, height;
        public final boolean hasAlpha;

        public Image(int[] argb, int width, int height, boolean hasAlpha) {
            this.argb = argb;
            this.width = width;
            this.height = height;
            this.hasAlpha = hasAlpha;
        }
    }

    /** How two sets of output codes compare. */
    public static final class Comparison {
        public int images, identical, top1Agree, maxLsb;
        /** "image i, output j: got g, stored s" or null. */
        public String firstDifference;

        public double top1Agreement() {
            return images == 0 ? 1.0 : (double) top1Agree / images;
        }

        public boolean pass() {
            return identical == images;
        }

        @Override
        public String toString() {
            return String.format("%d/%d identical, top-1 agreement %.4f, max %d LSB%s", identical, images,
                    top1Agreement(), maxLsb, firstDifference == null ? "" : ", first difference: " + firstDifference);
        }
    }

    /** Output codes per image against the stored ones. */
    public static Comparison compare(int[][] got, int[][] stored) {
        Comparison c = new Comparison();
        c.images = stored.length;
        for (int i = 0; i < stored.length; i++) {
            boolean same = true;
            for (int j = 0; j < stored[i].length; j++) {
                int d = Math.abs(got[i][j] - stored[i][j]);
                if (d != 0) {
                    same = false;
                    if (c.firstDifference == null) {
                        c.firstDifference = "image " + i + ", output " + j + ": got " + got[i][j] + ", stored " + stored[i][j];
                    }
                }
                c.maxLsb = Math.max(c.maxLsb, d);
            }
            if (same) c.identical++;
            if (Codes.topK(got[i], 1)[0] == Codes.topK(stored[i], 1)[0]) c.top1Agree++;
        }
        return c;
    }

    public static String sha256(byte[] data) {
        try {
            byte[] d = MessageDigest.getInstance("SHA-256").digest(data);
            StringBuilder s = new StringBuilder();
            for (byte b : d) s.append(String.format("%02x", b));
            return s.toString();
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException(e);
        }
    }

    private final PackageFiles files;
    public final Manifest manifest;

    public GoldenCheck(PackageFiles files) throws IOException, PackageException {
        this.files = files;
        this.manifest = Manifest.parse(new String(files.read("manifest.json"), StandardCharsets.UTF_8));
    }

    /** Sizes and sha256 of the model and of every file the manifest lists; throws naming the first bad one. */
    public void verifyFiles() throws IOException, PackageException {
        byte[] model = files.read(manifest.modelFile);
        if (!sha256(model).equals(manifest.modelSha256)) {
            throw new PackageException(manifest.modelFile + ": sha256 differs from the manifest (corrupt or replaced model).");
        }
        for (String rel : manifest.fileSha256.keySet()) {
            byte[] data = files.read(rel);
            if (data.length != manifest.fileBytes.get(rel)) {
                throw new PackageException(rel + ": " + data.length + " bytes, the manifest says " + manifest.fileBytes.get(rel)
                        + " (truncated or corrupt).");
            }
            if (!sha256(data).equals(manifest.fileSha256.get(rel))) {
                throw new PackageException(rel + ": sha256 differs from the manifest (corrupt or replaced).");
            }
        }
    }

    public GoldenTensor tensor(String name) throws IOException, PackageException {
        return GoldenTensor.parse(files.read("golden/" + name), "golden/" + name);
    }

    /** Indices of the golden images whose preprocessing here differs from the stored input tensor (empty: all same). */
    public List<Integer> preprocessingMismatches(Decoder decoder) throws IOException, PackageException {
        GoldenTensor inputs = tensor("input.bin");
        Preprocessor prep = new Preprocessor(manifest);
        List<Integer> bad = new ArrayList<>();
        for (int i = 0; i < manifest.goldenImages.size(); i++) {
            Image im = decoder.decode(files.read(manifest.goldenImages.get(i)));
            if (!Arrays.equals(prep.tensor(im.argb, im.width, im.height, im.hasAlpha), inputs.rowBytes(i))) bad.add(i);
        }
        return bad;
    }

    /** The stored input tensors run through {@code runner}, against {@code stored} ("xnnpack.bin" or "reference.bin"). */
    public Comparison run(Runner runner, String stored, long[] latencyNanos) throws Exception {
        GoldenTensor inputs = tensor("input.bin"), want = tensor(stored);
        int n = want.shape[0];
        int[][] got = new int[n][], ref = new int[n][];
        int dtype = manifest.output.dtype.equals("uint8") ? GoldenTensor.UINT8 : GoldenTensor.INT8;
        for (int i = 0; i < n; i++) {
            long t0 = System.nanoTime();
            byte[] out = runner.run(inputs.rowBytes(i));
            if (latencyNanos != null && i < latencyNanos.length) latencyNanos[i] = System.nanoTime() - t0;
            got[i] = Codes.toInts(out, dtype);
            ref[i] = want.row(i);
        }
        return compare(got, ref);
    }

    /** The q-quantile (0..1) of the recorded latencies, in milliseconds (numpy's linear interpolation). */
    public static double quantileMs(long[] nanos, double q) {
        long[] s = nanos.clone();
        Arrays.sort(s);
        double pos = q * (s.length - 1);
        int lo = (int) Math.floor(pos), hi = (int) Math.ceil(pos);
        return (s[lo] + (s[hi] - s[lo]) * (pos - lo)) / 1e6;
    }
}
