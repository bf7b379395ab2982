package dev.mobileqat.demo;

import android.content.res.AssetFileDescriptor;
import android.content.res.AssetManager;
import java.io.FileInputStream;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.MappedByteBuffer;
import java.nio.channels.FileChannel;
import org.tensorflow.lite.Interpreter;

/** The package's model on LiteRT's Interpreter with XNNPACK: raw input bytes in, raw output bytes out (batch 1). */
final class LiteRt implements AutoCloseable, dev.mobileqat.core.GoldenCheck.Runner {
    private final Interpreter interpreter;
    private final ByteBuffer in, out;

    LiteRt(AssetManager assets, String path, int threads) throws IOException {
        MappedByteBuffer model;
        try (AssetFileDescriptor fd = assets.openFd(path);
             FileChannel ch = new FileInputStream(fd.getFileDescriptor()).getChannel()) {
            model = ch.map(FileChannel.MapMode.READ_ONLY, fd.getStartOffset(), fd.getDeclaredLength());
        }
        interpreter = new Interpreter(model, new Interpreter.Options().setUseXNNPACK(true).setNumThreads(threads));
        in = ByteBuffer.allocateDirect(interpreter.getInputTensor(0).numBytes()).order(ByteOrder.nativeOrder());
        out = ByteBuffer.allocateDirect(interpreter.getOutputTensor(0).numBytes()).order(ByteOrder.nativeOrder());
    }

    @Override
    public byte[] run(byte[] input) {
        in.clear();
        in.put(input).rewind();
        out.clear();
        interpreter.run(in, out);
        byte[] result = new byte[out.capacity()];
        out.rewind();
        out.get(result);
        return result;
    }

    @Override
    public void close() {
        interpreter.close();
    }
}
