package dev.mobileqat.core;

import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.NoSuchFileException;
import java.nio.file.Path;

/** Read access to a package's files by their relative path (a folder on a computer, the APK's assets on Android). */
public interface PackageFiles {
    byte[] read(String relativePath) throws IOException;

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
