package dev.mobileqat.core;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import com.google.gson.JsonObject;
import java.awt.image.BufferedImage;
import java.awt.image.Raster;
import java.io.ByteArrayInputStream;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.Arrays;
import java.util.Comparator;
import java.util.List;
import java.util.stream.Stream;
import javax.imageio.ImageIO;
import org.junit.Test;

/**
 * The plain-Java core against files the Python side wrote: a package ({@code -Dmobileqat.package=DIR}) and Pillow
 * resize fixtures ({@code -Dmobileqat.fixtures=DIR}: k_src.png, k_dst.bin with Pillow's bilinear result).
 */
public class CoreTest {
    private static final Path PKG = Paths.get(System.getProperty("mobileqat.package", "missing"));
    private static final Path FIXTURES = Paths.get(System.getProperty("mobileqat.fixtures", "missing"));

    /** ImageIO decoding for the JVM; gray PNGs are read from the raster (getRGB would apply a gamma to them). */
    static GoldenCheck.Image decode(byte[] png) throws IOException {
        BufferedImage im = ImageIO.read(new ByteArrayInputStream(png));
        int w = im.getWidth(), h = im.getHeight();
        int[] argb = new int[w * h];
        Raster r = im.getRaster();
        if (im.getType() == BufferedImage.TYPE_BYTE_GRAY) {
            for (int i = 0; i < w * h; i++) {
                int v = r.getSample(i % w, i / w, 0);
                argb[i] = 0xff000000 | (v << 16) | (v << 8) | v;
            }
        } else {
            im.getRGB(0, 0, w, h, argb, 0, w);
        }
        return new GoldenCheck.Image(argb, w, h, im.getColorModel().hasAlpha());
    }

    @Test
    public void preprocessingGivesThePythonInputTensorsByteForByte() throws Exception {
        GoldenCheck check = new GoldenCheck(PackageFiles.folder(PKG));
        assertTrue("the package has golden images", check.manifest.goldenImages.size() > 0);
        List<Integer> bad = check.preprocessingMismatches(CoreTest::decode);
        assertEquals("golden images whose Java preprocessing differs from Python's", List.of(), bad);
        // the resize is exercised: some golden PNG is not at the input size
        boolean resized = false;
        for (String rel : check.manifest.goldenImages) {
            GoldenCheck.Image im = decode(Files.readAllBytes(PKG.resolve(rel)));
            resized |= im.width != check.manifest.input.width() || im.height != check.manifest.input.height();
        }
        assertTrue("no golden PNG needs a resize: the test would not cover it", resized);
    }

    @Test
    public void pillowBilinearResizeIsReproducedExactly() throws Exception {
        int cases = 0;
        try (Stream<Path> s = Files.list(FIXTURES)) {
            for (Path src : (Iterable<Path>) s.filter(p -> p.toString().endsWith("_src.png")).sorted()::iterator) {
                GoldenCheck.Image im = decode(Files.readAllBytes(src));
                GoldenTensor want = GoldenTensor.parse(Files.readAllBytes(
                        Paths.get(src.toString().replace("_src.png", "_dst.bin"))), src.toString());
                int channels = want.shape[2];
                int[] px = new int[im.width * im.height * channels];
                for (int i = 0; i < im.width * im.height; i++) {
                    for (int c = 0; c < channels; c++) px[i * channels + c] = (im.argb[i] >> (8 * (2 - c))) & 0xff;
                }
                int[] got = PillowBilinear.resize(px, im.width, im.height, channels, want.shape[1], want.shape[0]);
                assertArrayEquals(src.getFileName() + ": " + im.width + "x" + im.height + " -> " + want.shape[1] + "x"
                        + want.shape[0], Codes.toInts(want.data, want.dtype), got);
                cases++;
            }
        }
        assertTrue("fixtures found", cases >= 4);
    }

    @Test
    public void storedCodesCompareAsPythonComputed() throws Exception {
        GoldenCheck check = new GoldenCheck(PackageFiles.folder(PKG));
        check.verifyFiles();
        GoldenTensor ref = check.tensor("reference.bin"), xnn = check.tensor("xnnpack.bin");
        int n = ref.shape[0];
        int[][] a = new int[n][], b = new int[n][];
        for (int i = 0; i < n; i++) {
            a[i] = xnn.row(i);
            b[i] = ref.row(i);
        }
        GoldenCheck.Comparison c = GoldenCheck.compare(a, b);
        JsonObject py = check.manifest.json.getAsJsonObject("validation").getAsJsonObject("golden")
                .getAsJsonObject("reference_vs_xnnpack");
        assertEquals(py.get("images").getAsInt(), c.images);
        assertEquals(py.get("identical").getAsInt(), c.identical);
        assertEquals(py.get("max_lsb_diff").getAsInt(), c.maxLsb);
        assertEquals(py.get("top1_agreement").getAsDouble(), c.top1Agreement(), 1e-12);
        // a runner that returns the stored XNNPACK codes passes against them, and fails against a changed code
        GoldenCheck.Comparison same = check.run(input -> xnn.rowBytes(indexOf(check, input)), "xnnpack.bin", null);
        assertTrue(same.toString(), same.pass());
    }

    private static int indexOf(GoldenCheck check, byte[] input) throws Exception {
        GoldenTensor inputs = check.tensor("input.bin");
        for (int i = 0; i < inputs.shape[0]; i++) {
            if (Arrays.equals(inputs.rowBytes(i), input)) return i;
        }
        throw new AssertionError("input not in input.bin");
    }

    @Test
    public void truncatedCorruptAndReplacedFilesAreNamed() throws Exception {
        Path copy = Files.createTempDirectory("mobileqat-pkg");
        try {
            copyTree(PKG, copy);
            byte[] input = Files.readAllBytes(copy.resolve("golden/input.bin"));
            try {
                GoldenTensor.parse(Arrays.copyOf(input, input.length - 1), "golden/input.bin");
                fail("a truncated tensor was accepted");
            } catch (PackageException e) {
                assertTrue(e.getMessage(), e.getMessage().contains("golden/input.bin") && e.getMessage().contains("truncated"));
            }
            Files.write(copy.resolve("golden/input.bin"), Arrays.copyOf(input, input.length - 1));
            expectFailure(copy, "golden/input.bin");
            Files.write(copy.resolve("golden/input.bin"), input);
            byte[] model = Files.readAllBytes(copy.resolve("model.tflite"));
            model[model.length / 2] ^= 1;
            Files.write(copy.resolve("model.tflite"), model);
            expectFailure(copy, "model.tflite");
        } finally {
            try (Stream<Path> s = Files.walk(copy)) {
                s.sorted(Comparator.reverseOrder()).forEach(p -> p.toFile().delete());
            }
        }
    }

    private static void expectFailure(Path pkg, String name) throws Exception {
        try {
            new GoldenCheck(PackageFiles.folder(pkg)).verifyFiles();
            fail(name + ": the change was not detected");
        } catch (PackageException e) {
            assertTrue(e.getMessage(), e.getMessage().startsWith(name));
        }
    }

    private static void copyTree(Path from, Path to) throws IOException {
        try (Stream<Path> s = Files.walk(from)) {
            for (Path p : (Iterable<Path>) s::iterator) {
                Path t = to.resolve(from.relativize(p).toString());
                if (Files.isDirectory(p)) Files.createDirectories(t);
                else Files.copy(p, t);
            }
        }
    }

    @Test
    public void topKAndDequantizeFollowNumpy() {
        assertArrayEquals(new int[]{2, 0, 3}, Codes.topK(new int[]{5, -3, 9, 5}, 3));
        assertEquals(0.5, Codes.dequantize(0, 0.00390625, -128), 0.0);
    }
}
