package dev.mobileqat.core;

/** A package file that is missing, corrupt, truncated, of a wrong hash or of an unknown kind; the message names it. */
public class PackageException extends Exception {
    private static final long serialVersionUID = 1L;

    public PackageException(String message) {
        super(message);
    }
}
