package dev.mobileqat.demo;

import android.content.res.AssetManager;
import android.graphics.Bitmap;
import android.graphics.BitmapFactory;
import android.graphics.ColorSpace;
import dev.mobileqat.core.GoldenCheck;
import dev.mobileqat.core.PackageFiles;
import java.io.IOException;
import java.io.InputStream;

/** The bundled package (assets/package/) and image decoding for the core. */
final class Assets {
    static final String PACKAGE = "package/";

    private Assets() {
    }

    static PackageFiles packageFiles(AssetManager assets) {
        return rel -> {
            try (InputStream s = assets.open(PACKAGE + rel)) {
                return PackageFiles.readAll(s);
            }
        };
    }

    /** PNG/JPEG bytes -> unpremultiplied sRGB ARGB pixels at the file's own size (no density scaling). */
    static GoldenCheck.Image decode(byte[] data) throws IOException {
        BitmapFactory.Options o = new BitmapFactory.Options();
        o.inPreferredConfig = Bitmap.Config.ARGB_8888;
        o.inScaled = false;
        o.inPreferredColorSpace = ColorSpace.get(ColorSpace.Named.SRGB);
        Bitmap b = BitmapFactory.decodeByteArray(data, 0, data.length, o);
        if (b == null) throw new IOException("not an image Android can decode");
        return pixels(b);
    }

    static GoldenCheck.Image pixels(Bitmap b) {
        int w = b.getWidth(), h = b.getHeight();
        int[] argb = new int[w * h];
        b.getPixels(argb, 0, w, 0, 0, w, h);  // unpremultiplied
        return new GoldenCheck.Image(argb, w, h, b.hasAlpha());
    }
}
