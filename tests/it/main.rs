mod helpers;
mod http;
mod library;
mod redis;
mod reliability;
