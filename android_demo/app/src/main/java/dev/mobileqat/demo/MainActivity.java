package dev.mobileqat.demo;

import android.app.Activity;
import android.content.Intent;
import android.graphics.Bitmap;
import android.graphics.BitmapFactory;
import android.graphics.Matrix;
import android.media.ExifInterface;
import android.net.Uri;
import android.os.Bundle;
import android.widget.ImageView;
import android.widget.TextView;
import dev.mobileqat.core.Codes;
import dev.mobileqat.core.GoldenCheck;
import dev.mobileqat.core.Manifest;
import dev.mobileqat.core.Preprocessor;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;

/** Classify an image from the gallery or the camera with the bundled package: top 3 and the latency. */
public class MainActivity extends Activity {
    private static final int GALLERY = 1, CAMERA = 2;
    private final ExecutorService worker = Executors.newSingleThreadExecutor();
    private Manifest manifest;
    private String[] labels;
    private LiteRt model;

    @Override
    protected void onCreate(Bundle state) {
        super.onCreate(state);
        setContentView(R.layout.activity_main);
        findViewById(R.id.gallery).setOnClickListener(v -> startActivityForResult(
                new Intent(Intent.ACTION_GET_CONTENT).setType("image/*"), GALLERY));
        findViewById(R.id.camera).setOnClickListener(v -> startActivityForResult(
                new Intent(android.provider.MediaStore.ACTION_IMAGE_CAPTURE), CAMERA));
        findViewById(R.id.validate).setOnClickListener(v -> startActivity(new Intent(this, ValidateActivity.class)));
        worker.execute(() -> {
            try {
                GoldenCheck pkg = new GoldenCheck(Assets.packageFiles(getAssets()));
                manifest = pkg.manifest;
                labels = new String(Assets.packageFiles(getAssets()).read("labels.txt"), StandardCharsets.UTF_8).split("\n");
                model = new LiteRt(getAssets(), Assets.PACKAGE + manifest.modelFile, 1);
                show("Model ready: " + manifest.input.width() + "x" + manifest.input.height() + ", pick an image.");
            } catch (Exception e) {
                show("Could not load the bundled package: " + e.getMessage());
            }
        });
    }

    @Override
    protected void onActivityResult(int request, int result, Intent data) {
        super.onActivityResult(request, result, data);
        if (result != RESULT_OK || data == null) return;
        worker.execute(() -> {
            try {
                Bitmap bitmap = request == CAMERA ? (Bitmap) data.getExtras().get("data") : load(data.getData());
                runOnUiThread(() -> ((ImageView) findViewById(R.id.image)).setImageBitmap(bitmap));
                classify(bitmap);
            } catch (Exception e) {
                show("Could not classify: " + e.getMessage());
            }
        });
    }

    private Bitmap load(Uri uri) throws Exception {
        BitmapFactory.Options o = new BitmapFactory.Options();
        o.inPreferredConfig = Bitmap.Config.ARGB_8888;
        Bitmap b;
        try (InputStream s = getContentResolver().openInputStream(uri)) {
            b = BitmapFactory.decodeStream(s, null, o);
        }
        int degrees;
        try (InputStream s = getContentResolver().openInputStream(uri)) {  // EXIF orientation, as Pillow's exif_transpose
            int orientation = new ExifInterface(s).getAttributeInt(ExifInterface.TAG_ORIENTATION, ExifInterface.ORIENTATION_NORMAL);
            degrees = orientation == ExifInterface.ORIENTATION_ROTATE_90 ? 90
                    : orientation == ExifInterface.ORIENTATION_ROTATE_180 ? 180
                    : orientation == ExifInterface.ORIENTATION_ROTATE_270 ? 270 : 0;
        }
        if (degrees == 0) return b;
        Matrix m = new Matrix();
        m.postRotate(degrees);
        return Bitmap.createBitmap(b, 0, 0, b.getWidth(), b.getHeight(), m, false);
    }

    private void classify(Bitmap bitmap) throws Exception {
        GoldenCheck.Image im = Assets.pixels(bitmap.copy(Bitmap.Config.ARGB_8888, false));
        byte[] input = new Preprocessor(manifest).tensor(im.argb, im.width, im.height, im.hasAlpha);
        long t0 = System.nanoTime();
        byte[] output = model.run(input);
        double ms = (System.nanoTime() - t0) / 1e6;
        int[] codes = Codes.toInts(output, manifest.output.dtype.equals("uint8") ? 2 : 1);
        StringBuilder s = new StringBuilder();
        for (int i : Codes.topK(codes, 3)) {
            double p = Codes.dequantize(codes[i], manifest.output.scale, manifest.output.zeroPoint);
            s.append(String.format("%-16s %.3f%n", i < labels.length ? labels[i] : ("class " + i), p));
        }
        s.append(String.format("%nXNNPACK, 1 thread: %.2f ms", ms));
        show(s.toString());
    }

    private void show(String text) {
        runOnUiThread(() -> ((TextView) findViewById(R.id.result)).setText(text));
    }

    @Override
    protected void onDestroy() {
        worker.shutdown();
        if (model != null) model.close();
        super.onDestroy();
    }
}
