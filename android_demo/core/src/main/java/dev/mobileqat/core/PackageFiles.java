package dev.mobileqat.core;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.nio.file.Files;
import java.nio.file.NoSuchFileException;
import java.nio.file.Path;

/** Read access to a package's files by their relative path (a folder on a computer, the APK's assets on Android). */
public interface PackageFiles {
    byte[] read(String relativePath) throws IOException;

    /** All bytes of a stream (InputStream.readAllBytes needs Android API 33). */
    static byte[] readAll(InputStream in) throws IOException {
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        byte[] buf = new byte[1 << 16];
        for (int n; (n = in.read(buf)) > 0; ) out.write(buf, 0, n);
        return out.toByteArray();
    }

    static PackageFiles folder(Path root) {
        return rel -> {
            try {
                return Files.readAllBytes(root.resolve(rel));
            } catch (NoSuchFileException e) {
                throw new IOException(rel + ": missing from the package " + root, e);
            }
        };
    }
}
